//! (being written) certificate authority primitives.
