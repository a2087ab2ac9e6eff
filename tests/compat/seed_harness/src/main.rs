//! A tiny CLI over the seed's `RootfsRegistry`, configured by its own `RootfsConfig::from_env`
//! (MICROVM_ROOTFS_TEMPLATE_DIR, MICROVM_ROOTFS_CLONES_DIR).
//!
//!   seed-harness stacks              one JSON array of {name, size_bytes, sha256}
//!   seed-harness clone VM_ID STACK   one JSON object {vm_id, stack, path, source_sha256}
//!   seed-harness release VM_ID       nothing
//!
//! Any error: its text on stderr, exit status 1. Wrong usage: exit status 2.

mod error;
// The seed is a library; this CLI uses part of it (RootfsRegistry::config is unused here).
#[allow(dead_code)]
mod rootfs;

use std::process::ExitCode;

use serde_json::json;

use crate::error::VmRuntimeResult;
use crate::rootfs::RootfsRegistry;

const USAGE: &str = "usage: seed-harness stacks | clone VM_ID STACK | release VM_ID";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let registry = RootfsRegistry::from_env();
    let result = match argv.as_slice() {
        ["stacks"] => stacks(&registry),
        ["clone", vm_id, stack] => clone(&registry, vm_id, stack),
        ["release", vm_id] => registry.release(vm_id),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn stacks(registry: &RootfsRegistry) -> VmRuntimeResult<()> {
    let stacks: Vec<_> = registry
        .stacks()?
        .into_iter()
        .map(|s| json!({"name": s.name, "size_bytes": s.size_bytes, "sha256": s.sha256}))
        .collect();
    println!("{}", serde_json::Value::Array(stacks));
    Ok(())
}

fn clone(registry: &RootfsRegistry, vm_id: &str, stack: &str) -> VmRuntimeResult<()> {
    let vm = registry.clone_for_vm(vm_id, stack)?;
    println!(
        "{}",
        json!({
            "vm_id": vm.vm_id,
            "stack": vm.stack,
            "path": vm.path.to_string_lossy(),
            "source_sha256": vm.source_sha256,
        })
    );
    Ok(())
}
