//! Names: the provider hostnames resolved to addresses (`resolver`), the
//! DNS answers the kernel gives up on (`dns`), and userspace readers of
//! ClientHellos (`sni`) and CONNECT lines (`connect_line`) that follow the
//! kernel's rules step for step (for the fuzz targets and the tests).

pub mod connect_line;
pub mod dns;
pub mod resolver;
pub mod sni;
