//! local backend (work in progress).
