//! terraform backend (work in progress).
