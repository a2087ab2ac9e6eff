//! The seed's `crate::error`, reproduced: the two variants `rootfs.rs` uses and its result alias.

use std::fmt;

#[derive(Debug)]
pub enum VmRuntimeError {
    Rootfs(String),
    StatePoisoned,
}

pub type VmRuntimeResult<T> = Result<T, VmRuntimeError>;

impl fmt::Display for VmRuntimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rootfs(msg) => write!(f, "rootfs: {msg}"),
            Self::StatePoisoned => f.write_str("runtime state lock poisoned"),
        }
    }
}

impl std::error::Error for VmRuntimeError {}
