//! ansible backend (work in progress).
