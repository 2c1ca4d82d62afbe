//! The broker's connection limits, as a device meets them: a connection
//! closed before its TLS handshake (fleetgate accepts a connection over its
//! per-address rate or its caps and closes it at once, so the client sees
//! only an end of file). Counted, described where it is reported, and met
//! as a real device would: back off with jitter and try again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{ConnectionError, TlsError};

static CLOSED: AtomicU64 = AtomicU64::new(0);

/// What it most likely means, for a person reading the error.
pub const HINT: &str = "most likely the broker's connection limits (a default `fleetgate \
                        serve` takes 100 new connections a second from one address, a burst of \
                        200: --connect-rate-per-ip, --connect-burst-per-ip; and \
                        --max-handshakes, --max-connections)";

/// Whether `e`, met before CONNACK, is the broker closing the connection
/// before the TLS handshake.
pub fn closed_early(e: &ConnectionError) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    let io = match e {
        ConnectionError::Io(e) | ConnectionError::Tls(TlsError::Io(e)) => e,
        _ => return false,
    };
    matches!(
        io.kind(),
        UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted
    )
}

/// Counts one such close; returns the error with what it means.
pub fn count(e: &ConnectionError) -> String {
    CLOSED.fetch_add(1, Ordering::Relaxed);
    format!("{e}: closed before the TLS handshake, {HINT}")
}

/// Connections closed before their handshake so far, in this process.
pub fn total() -> u64 {
    CLOSED.load(Ordering::Relaxed)
}

/// How long to wait before the next try, at `step` (jittered: half to
/// all of it, by `unit` in [0, 1)); `step` doubles, up to 10 s.
pub fn next_wait(step: &mut Duration, unit: f64) -> Duration {
    let wait = step.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0));
    *step = (*step * 2).min(Duration::from_secs(10));
    wait
}

/// After a connection closed before its handshake (`e`): counts it and
/// waits the next step, or, if that wait would end past `deadline`, gives
/// the reason to give up with.
pub async fn back_off(
    e: &ConnectionError,
    step: &mut Duration,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    let why = count(e);
    let wait = next_wait(step, clock_unit());
    if tokio::time::Instant::now() + wait >= deadline {
        return Err(why);
    }
    tokio::time::sleep(wait).await;
    Ok(())
}

/// A number in [0, 1) from the clock, for jitter where no seeded
/// generator is at hand.
pub fn clock_unit() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1_000_000) / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_early_close_is_told_apart_from_a_refusal() {
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert!(closed_early(&ConnectionError::Tls(TlsError::Io(eof))));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(closed_early(&ConnectionError::Io(reset)));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(
            !closed_early(&ConnectionError::Io(refused)),
            "nothing listens"
        );
        assert!(!closed_early(&ConnectionError::ConnectionRefused(
            rumqttc::ConnectReturnCode::NotAuthorized
        )));
        let before = total();
        let said = count(&ConnectionError::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(said.contains("--connect-rate-per-ip"), "{said}");
        assert_eq!(total(), before + 1);
    }

    #[test]
    fn waits_double_up_to_ten_seconds_with_jitter() {
        let mut step = Duration::from_millis(200);
        assert_eq!(next_wait(&mut step, 0.0), Duration::from_millis(100));
        assert_eq!(next_wait(&mut step, 0.999_999).as_millis(), 399);
        for _ in 0..10 {
            next_wait(&mut step, 0.5);
        }
        assert_eq!(step, Duration::from_secs(10));
    }
}
