//! Integration tests: the real server over real sockets.

mod admission;
mod cluster;
mod common;
mod connections;
mod dxcluster;
mod fanout;
mod faults;
mod hostile;
mod internal_api;
mod nginx;
mod ops;
mod process;
mod resume;
mod security;
mod sse;
mod trust;
mod websocket;
