//! Integration tests: the real binary and library entry points against the embedded broker
//! over TCP, real RocksDB in temporary directories, real HTTP on loopback.

mod aep43;
mod agent;
mod auth;
mod backpressure;
mod cdp;
mod cli;
mod cluster;
mod common;
mod compare;
mod config;
mod crash;
mod dashboard;
mod demo;
mod deploy;
mod disk;
mod docs;
mod feeds;
mod hostile;
mod openapi;
mod pipeline;
mod real_node;
mod real_node_dra;
mod retention;
mod tls;
