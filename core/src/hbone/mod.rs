//! (being written) HBONE: HTTP/2 CONNECT over mutual TLS.
