//! Integration tests: the real server over real sockets.

mod common;
mod internal_api;
mod process;
mod resume;
mod sse;
mod websocket;
