//! GPU memory as the NVIDIA driver reports it.
//!
//! Workers built with the `cuda` feature report, after they load their
//! model and after every call, how much device memory their own process
//! holds and how much the device has free ([`WorkerMessage::Memory`]): the
//! daemon's admin view, metrics and `auto` policy use these measured
//! figures instead of the configured `memory_mb`, and every phase switch
//! records them before and after (the proof that switching phases really
//! returned the GPU memory).
//!
//! NVML (`libnvidia-ml.so`) is loaded at run time by `nvml-wrapper`: a
//! machine without the NVIDIA driver builds and runs the same binary and
//! simply has no figures ([`query`] returns `None`).
//!
//! [`WorkerMessage::Memory`]: crate::protocol::WorkerMessage::Memory

use std::sync::OnceLock;

use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;
use serde::{Deserialize, Serialize};

/// One process's share of one GPU, and that GPU's memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceMemory {
    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub device: String,
    /// Its NVML index.
    pub index: u32,
    /// Memory the reporting process holds on it.
    pub process_bytes: u64,
    /// Unallocated and installed memory of the device (all processes).
    pub free_bytes: u64,
    pub total_bytes: u64,
}

fn nvml() -> Option<&'static Nvml> {
    static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
    NVML.get_or_init(|| Nvml::init().ok()).as_ref()
}

/// The GPU memory process `pid` holds, on the first device where it holds
/// any: `None` without the NVIDIA driver, or when the process holds no
/// device memory (its model runs on the CPU).
pub fn query(pid: u32) -> Option<DeviceMemory> {
    let nvml = nvml()?;
    for index in 0..nvml.device_count().ok()? {
        let Ok(dev) = nvml.device_by_index(index) else {
            continue;
        };
        let Ok(procs) = dev.running_compute_processes() else {
            continue;
        };
        let Some(mine) = procs.iter().find(|p| p.pid == pid) else {
            continue;
        };
        let process_bytes = match mine.used_gpu_memory {
            UsedGpuMemory::Used(b) => b,
            UsedGpuMemory::Unavailable => 0,
        };
        let mem = dev.memory_info().ok()?;
        return Some(DeviceMemory {
            device: dev.name().unwrap_or_else(|_| format!("GPU {index}")),
            index,
            process_bytes,
            free_bytes: mem.free,
            total_bytes: mem.total,
        });
    }
    None
}

/// [`query`] for this process.
pub fn this_process() -> Option<DeviceMemory> {
    query(std::process::id())
}

/// The `Memory` frame a worker sends after loading and after each call,
/// when its model is on a GPU (`on_gpu`: built with the `cuda` feature)
/// and the driver reports this process there.
pub fn frame(on_gpu: bool) -> Option<crate::protocol::WorkerMessage> {
    if !on_gpu {
        return None;
    }
    this_process().map(|device| crate::protocol::WorkerMessage::Memory { device })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_on_no_gpu_has_no_figures() {
        // This test process never touches a GPU: on a machine without the
        // driver NVML does not load; with one, this pid holds nothing.
        assert_eq!(this_process(), None);
    }

    #[test]
    fn the_frame_round_trips() {
        let m = DeviceMemory {
            device: "NVIDIA H100 80GB HBM3".into(),
            index: 0,
            process_bytes: 5 << 30,
            free_bytes: 70 << 30,
            total_bytes: 80 << 30,
        };
        let s = serde_json::to_string(&m).expect("json");
        assert_eq!(serde_json::from_str::<DeviceMemory>(&s).expect("back"), m);
    }
}
