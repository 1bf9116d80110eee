//! Values as operators write them, shared by every reader of flags and config files: durations
//! (`500ms`, `1s`, `2m`, `1h`), sizes (`64KiB`), listener address lists, RFC 3339 times. Each parser's error says
//! what to write instead. Imports nothing from the crate.
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A duration with a unit: `500ms`, `1s`, `2m`, `1h` (also `1500us`, `0s`).
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = value.split_at(digits);
    let hint = "expected a whole number with a unit (ms, s, m, h), e.g. 1s or 500ms";
    let number: u64 = number.parse().map_err(|_| hint.to_owned())?;
    let too_long = || "too long".to_owned();
    match unit.trim() {
        "us" | "µs" => Ok(Duration::from_micros(number)),
        "ms" => Ok(Duration::from_millis(number)),
        "s" => Ok(Duration::from_secs(number)),
        "m" => number
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(too_long),
        "h" => number
            .checked_mul(3600)
            .map(Duration::from_secs)
            .ok_or_else(too_long),
        "" => Err(format!("missing unit; {hint}")),
        _ => Err(hint.to_owned()),
    }
}

/// `1048576`, `512B`, `64KiB`, `1MiB`, `1GiB` (binary units; `K`/`M`/`G` accepted as the same).
pub fn parse_size(value: &str) -> Result<usize, String> {
    let value = value.trim();
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = value.split_at(digits);
    let hint = "expected a size in bytes, optionally with KiB, MiB or GiB, e.g. 64KiB";
    let number: usize = number.parse().map_err(|_| hint.to_owned())?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" | "k" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        _ => return Err(hint.to_owned()),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| "too large".to_owned())
}

/// `500ms`, `1s`, `2m`: durations as the flags take them.
pub fn fmt_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        let s = d.as_secs();
        match s {
            s if s != 0 && s % 3600 == 0 => format!("{}h", s / 3600),
            s if s != 0 && s % 60 == 0 => format!("{}m", s / 60),
            s => format!("{s}s"),
        }
    } else if d.subsec_nanos() % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}us", d.as_micros())
    }
}

/// `ADDR[,ADDR...]`, each `IPv4:PORT` or `[IPv6]:PORT`.
pub fn parse_addrs(value: &str) -> Result<Vec<SocketAddr>, String> {
    let mut addrs = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let addr: SocketAddr = item.parse().map_err(|_| {
            format!("{item:?} is not an address; use IP:PORT or [IPv6]:PORT, e.g. 127.0.0.1:15001")
        })?;
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    if addrs.is_empty() {
        return Err("no address given; e.g. 127.0.0.1:15001".to_owned());
    }
    Ok(addrs)
}

/// A URL as it may be shown to anyone who can read `/config` or a log: user information
/// (`user:password@`) and the query string (tokens often travel there) are replaced with
/// `REDACTED`; scheme, host, port and path stay.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("REDACTED@{host}"),
        None => authority.to_owned(),
    };
    let path = match path.split_once('?') {
        Some((path, _)) => format!("{path}?REDACTED"),
        None => path.to_owned(),
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{authority}{path}"),
        None => format!("{authority}{path}"),
    }
}

/// RFC 3339 UTC with milliseconds, e.g. `2024-05-01T12:34:56.789Z` (no date crate for one line).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Whole seconds since the Unix epoch (0 before it; saturating far after).
pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip() {
        for (text, d) in [
            ("500ms", Duration::from_millis(500)),
            ("1s", Duration::from_secs(1)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("1500us", Duration::from_micros(1500)),
        ] {
            assert_eq!(parse_duration(text), Ok(d), "{text}");
            assert_eq!(parse_duration(&fmt_duration(d)), Ok(d), "{text}");
        }
        assert!(parse_duration("10").unwrap_err().contains("missing unit"));
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration(&format!("{}h", u64::MAX)).is_err());
    }

    #[test]
    fn urls_lose_their_secrets() {
        assert_eq!(
            redact_url("http://user:s3cret@collector:8080/logs?token=abc"),
            "http://REDACTED@collector:8080/logs?REDACTED"
        );
        assert_eq!(
            redact_url("http://collector:8080/logs"),
            "http://collector:8080/logs"
        );
        assert_eq!(
            redact_url("http://a@b@host/?x"),
            "http://REDACTED@host/?REDACTED"
        );
        assert_eq!(redact_url("http://host?token=1"), "http://host?REDACTED");
    }

    #[test]
    fn address_lists() {
        assert_eq!(
            parse_addrs("127.0.0.1:1, [::1]:2,127.0.0.1:1")
                .unwrap()
                .len(),
            2
        );
        assert!(parse_addrs("").is_err());
        assert!(parse_addrs("localhost:1")
            .unwrap_err()
            .contains("not an address"));
    }
}
