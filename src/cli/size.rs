//! Sizes on the command line: `512`, `4K`, `1.5G`, `16GiB`.

/// Parses a byte count with an optional binary suffix (K, M, G, T, P; `KiB`, `KB` and lower
/// case accepted, all meaning powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => {
            return Err(format!(
                "'{text}' is not a size: use a number with an optional K, M, G or T suffix, like 16G"
            ));
        }
    };
    let bad = || {
        format!(
            "'{text}' is not a size: use a number with an optional K, M, G or T suffix, like 16G"
        )
    };
    let bytes = if num.contains('.') {
        let v: f64 = num.parse().map_err(|_| bad())?;
        let b = v * (1u64 << shift) as f64;
        if !b.is_finite() || b >= u64::MAX as f64 {
            return Err(format!("'{text}' is too large"));
        }
        b.round() as u64
    } else {
        let v: u64 = num.parse().map_err(|_| bad())?;
        v.checked_mul(1u64 << shift)
            .ok_or_else(|| format!("'{text}' is too large"))?
    };
    Ok(bytes)
}

/// Formats a byte count the way [`parse_size`] reads it, exactly when possible.
pub fn format_size(bytes: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift {
            return format!("{:.1}{suffix}", bytes as f64 / (1u64 << shift) as f64);
        }
    }
    format!("{bytes}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("16GiB"), Ok(16 << 30));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5X").is_err());
        assert!(parse_size("99999999999P").is_err());
        assert_eq!(format_size(16 << 30), "16G");
        assert_eq!(format_size(1536 << 20), "1536M");
        assert_eq!(format_size(1000), "1000");
    }
}
