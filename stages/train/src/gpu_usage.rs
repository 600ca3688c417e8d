//! GPU utilization and memory while a benchmark runs, sampled through NVML (nvml-wrapper loads
//! `libnvidia-ml.so` at run time, so CPU builds and machines without a driver just report none).

use candle_core::{Device, DeviceLocation};
use nvml_wrapper::Nvml;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What the GPU did during a timed section.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct GpuUsage {
    /// Mean over samples of NVML's "percent of time a kernel was executing".
    pub utilization_percent: f64,
    /// Peak memory in use on the device (every process), MiB.
    pub peak_memory_mib: u64,
    pub samples: usize,
}

/// Samples one GPU every [`GpuSampler::PERIOD`] on a thread of its own until
/// [`GpuSampler::finish`].
pub struct GpuSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(u32, u64)>>,
}

impl GpuSampler {
    pub const PERIOD: Duration = Duration::from_millis(100);

    /// Starts sampling the GPU of `device`; `None` for the CPU, or when NVML is unavailable.
    pub fn start(device: &Device) -> Option<GpuSampler> {
        let DeviceLocation::Cuda { gpu_id } = device.location() else {
            return None;
        };
        let nvml = Nvml::init().ok()?;
        let selector = nvml_selector(
            gpu_id,
            std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
        )?;
        // Fail here, not silently on the thread, when the device cannot be read.
        read_sample(&nvml, &selector)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                if let Some(s) = read_sample(&nvml, &selector) {
                    samples.push(s);
                }
                std::thread::sleep(Self::PERIOD);
            }
            samples
        });
        Some(GpuSampler { stop, thread })
    }

    /// Stops sampling; `None` if no sample was taken (a section shorter than a period still
    /// gets the one taken at its start).
    pub fn finish(self) -> Option<GpuUsage> {
        self.stop.store(true, Ordering::Relaxed);
        summarize(&self.thread.join().ok()?)
    }
}

/// Which NVML device a CUDA ordinal is. NVML numbers every GPU of the machine and ignores
/// `CUDA_VISIBLE_DEVICES`, which renumbers them for CUDA: ordinal `k` is its `k`-th entry, an
/// index or a UUID. (NVML's order is PCI bus order; CUDA's default order may differ on
/// machines with unlike GPUs unless `CUDA_DEVICE_ORDER=PCI_BUS_ID`.)
#[derive(Clone, Debug, PartialEq, Eq)]
enum NvmlSelector {
    Index(u32),
    Uuid(String),
}

fn nvml_selector(cuda_ordinal: usize, visible: Option<&str>) -> Option<NvmlSelector> {
    let Some(visible) = visible.filter(|v| !v.trim().is_empty()) else {
        return Some(NvmlSelector::Index(cuda_ordinal as u32));
    };
    let entry = visible.split(',').nth(cuda_ordinal)?.trim();
    Some(match entry.parse::<u32>() {
        Ok(i) => NvmlSelector::Index(i),
        Err(_) => NvmlSelector::Uuid(entry.to_string()),
    })
}

fn read_sample(nvml: &Nvml, selector: &NvmlSelector) -> Option<(u32, u64)> {
    let device = match selector {
        NvmlSelector::Index(i) => nvml.device_by_index(*i),
        NvmlSelector::Uuid(u) => nvml.device_by_uuid(u.as_str()),
    }
    .ok()?;
    let utilization = device.utilization_rates().ok()?.gpu;
    let used = device.memory_info().ok()?.used;
    Some((utilization, used))
}

fn summarize(samples: &[(u32, u64)]) -> Option<GpuUsage> {
    if samples.is_empty() {
        return None;
    }
    let mean = samples.iter().map(|s| s.0 as f64).sum::<f64>() / samples.len() as f64;
    let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
    Some(GpuUsage {
        utilization_percent: mean,
        peak_memory_mib: peak / (1024 * 1024),
        samples: samples.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_ordinals_map_through_cuda_visible_devices() {
        use NvmlSelector::*;
        assert_eq!(nvml_selector(1, None), Some(Index(1)));
        assert_eq!(nvml_selector(0, Some("")), Some(Index(0)));
        assert_eq!(nvml_selector(0, Some("3,5")), Some(Index(3)));
        assert_eq!(nvml_selector(1, Some("3, 5")), Some(Index(5)));
        assert_eq!(nvml_selector(2, Some("3,5")), None);
        assert_eq!(
            nvml_selector(0, Some("GPU-8f6e1c2a-0000-1111-2222-333344445555")),
            Some(Uuid("GPU-8f6e1c2a-0000-1111-2222-333344445555".into()))
        );
    }

    #[test]
    fn usage_is_the_mean_utilization_and_the_peak_memory() {
        let mib = 1024 * 1024;
        let u = summarize(&[(90, 100 * mib), (70, 300 * mib), (80, 200 * mib)]).unwrap();
        assert_eq!(u.utilization_percent, 80.0);
        assert_eq!(u.peak_memory_mib, 300);
        assert_eq!(u.samples, 3);
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn the_cpu_has_no_gpu_usage() {
        assert!(GpuSampler::start(&Device::Cpu).is_none());
    }
}
