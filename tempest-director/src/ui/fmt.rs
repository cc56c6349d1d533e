//! How the UI writes figures: rates, latencies, sizes, ages.

/// A rate (or any small figure) with as many decimals as it deserves.
pub fn rate(v: f64) -> String {
    if !v.is_finite() || v <= 0.0 {
        "0".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A latency in milliseconds, `–` when there is none.
pub fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() && v >= 100.0 => format!("{v:.0} ms"),
        Some(v) if v.is_finite() && v >= 1.0 => format!("{v:.1} ms"),
        Some(v) if v.is_finite() => format!("{v:.3} ms"),
        _ => "–".into(),
    }
}

/// A byte count in binary units.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A span of seconds: `45s`, `12m 05s`, `3h 04m`, `2d 05h`.
pub fn secs(s: u64) -> String {
    let (d, h, m) = (s / 86_400, s / 3600 % 24, s / 60 % 60);
    if d > 0 {
        format!("{d}d {h:02}h")
    } else if s >= 3600 {
        format!("{}h {m:02}m", s / 3600)
    } else if s >= 60 {
        format!("{m}m {:02}s", s % 60)
    } else {
        format!("{s}s")
    }
}

/// How long before `now_ms` the moment `then_ms` was.
pub fn ago(then_ms: u64, now_ms: u64) -> String {
    if then_ms == 0 {
        return "never".into();
    }
    format!("{} ago", secs(now_ms.saturating_sub(then_ms) / 1000))
}

/// A fraction as a percentage.
pub fn percent(v: f64) -> String {
    if v.is_finite() {
        format!("{:.0}%", v * 100.0)
    } else {
        "–".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_well() {
        assert_eq!(rate(0.0), "0");
        assert_eq!(rate(1234.56), "1235");
        assert_eq!(rate(12.34), "12.3");
        assert_eq!(rate(f64::NAN), "0");
        assert_eq!(ms(None), "–");
        assert_eq!(ms(Some(2.5)), "2.5 ms");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(secs(59), "59s");
        assert_eq!(secs(3 * 3600 + 4 * 60), "3h 04m");
        assert_eq!(secs(2 * 86_400 + 5 * 3600), "2d 05h");
        assert_eq!(ago(1000, 6000), "5s ago");
        assert_eq!(ago(0, 6000), "never");
        assert_eq!(percent(0.42), "42%");
    }
}
