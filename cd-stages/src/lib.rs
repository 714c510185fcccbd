//! Built-in stages.
