//! Counts lagrouter's counters (by name, all labels summed) for the whole
//! test binary; tests compare before/after values.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

#[derive(Default)]
struct Capture {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl Recorder for Capture {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut map = self.counters.lock().unwrap();
        Counter::from_arc(map.entry(key.name().to_string()).or_default().clone())
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

static CAPTURE: OnceLock<Arc<Capture>> = OnceLock::new();

/// Installs the recorder (once per test binary).
pub fn install() {
    CAPTURE.get_or_init(|| {
        let c = Arc::new(Capture::default());
        metrics::set_global_recorder(c.clone()).expect("no other recorder");
        c
    });
}

/// The current value of counter `name`.
pub fn get(name: &str) -> u64 {
    CAPTURE
        .get()
        .and_then(|c| c.counters.lock().unwrap().get(name).cloned())
        .map_or(0, |v| v.load(Ordering::Relaxed))
}
