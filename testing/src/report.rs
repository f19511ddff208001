//! Measurement lines that bypass the test harness's output capture.

/// Writes a measurement line (`measured: …`) straight to the process's
/// standard error. Unlike `println!`, it is not captured by the test
/// harness, so the numbers a test observes (recovery times, lost-write
/// counts, …) show in every test run's output, CI's included.
pub fn report(line: impl std::fmt::Display) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "measured: {line}");
}
