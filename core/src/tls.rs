//! (being written) rustls configurations for HBONE mutual TLS.
