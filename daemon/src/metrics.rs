//! Prometheus metrics, served at `/metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub queue_length: IntGaugeVec,
    pub phase: IntGaugeVec,
    pub phase_seconds: HistogramVec,
    pub stage_seconds: HistogramVec,
    /// One claim transaction (row-lock waits included): several nodes
    /// claiming from one PostgreSQL queue.
    pub claim_seconds: prometheus::Histogram,
    pub jobs: IntCounterVec,
    pub worker_restarts: IntCounterVec,
    pub worker_unavailable: IntGaugeVec,
    pub worker_device_memory: IntGaugeVec,
    pub uploads: IntCounter,
    pub uploads_rejected: IntCounterVec,
}

const BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("viva".into()), None)?;
        let queue_length = IntGaugeVec::new(
            Opts::new("queue_length", "Jobs queued or running, by stage"),
            &["stage"],
        )?;
        let phase = IntGaugeVec::new(
            Opts::new("phase", "1 for the scheduler's current phase"),
            &["phase"],
        )?;
        let phase_seconds = HistogramVec::new(
            HistogramOpts::new("phase_duration_seconds", "How long each phase lasted")
                .buckets(BUCKETS.to_vec()),
            &["phase"],
        )?;
        let claim_seconds = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "claim_seconds",
                "Time to claim queued jobs (one transaction, lock waits included)",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
            ]),
        )?;
        let stage_seconds = HistogramVec::new(
            HistogramOpts::new(
                "stage_latency_seconds",
                "Per-stage latency: stt and eval service time, end-to-end total",
            )
            .buckets(BUCKETS.to_vec()),
            &["stage"],
        )?;
        let jobs = IntCounterVec::new(
            Opts::new("jobs_total", "Finished jobs by stage and outcome"),
            &["stage", "outcome"],
        )?;
        let worker_restarts = IntCounterVec::new(
            Opts::new("worker_restarts_total", "Unexpected worker exits, by slot"),
            &["slot"],
        )?;
        let worker_unavailable = IntGaugeVec::new(
            Opts::new(
                "worker_unavailable",
                "1 while a worker's role cannot load its model (the circuit breaker is open), by slot",
            ),
            &["slot"],
        )?;
        let worker_device_memory = IntGaugeVec::new(
            Opts::new(
                "worker_device_memory_bytes",
                "GPU memory a worker holds, as it last measured (NVML), by slot",
            ),
            &["slot"],
        )?;
        let uploads = IntCounter::new("uploads_total", "Accepted uploads")?;
        let uploads_rejected = IntCounterVec::new(
            Opts::new("uploads_rejected_total", "Rejected uploads by error code"),
            &["code"],
        )?;
        registry.register(Box::new(queue_length.clone()))?;
        registry.register(Box::new(phase.clone()))?;
        registry.register(Box::new(phase_seconds.clone()))?;
        registry.register(Box::new(stage_seconds.clone()))?;
        registry.register(Box::new(claim_seconds.clone()))?;
        registry.register(Box::new(jobs.clone()))?;
        registry.register(Box::new(worker_restarts.clone()))?;
        registry.register(Box::new(worker_unavailable.clone()))?;
        registry.register(Box::new(worker_device_memory.clone()))?;
        registry.register(Box::new(uploads.clone()))?;
        registry.register(Box::new(uploads_rejected.clone()))?;
        Ok(Metrics {
            registry,
            queue_length,
            phase,
            phase_seconds,
            stage_seconds,
            claim_seconds,
            jobs,
            worker_restarts,
            worker_unavailable,
            worker_device_memory,
            uploads,
            uploads_rejected,
        })
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new().expect("metrics");
        m.uploads_rejected.with_label_values(&["too_large"]).inc();
        m.queue_length.with_label_values(&["stt"]).set(3);
        let text = m.render();
        assert!(text.contains("viva_uploads_rejected_total{code=\"too_large\"} 1"));
        assert!(text.contains("viva_queue_length{stage=\"stt\"} 3"));
    }
}
