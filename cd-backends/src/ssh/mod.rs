//! ssh backend (work in progress).
