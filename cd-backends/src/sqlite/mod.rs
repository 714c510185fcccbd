//! sqlite backend (work in progress).
