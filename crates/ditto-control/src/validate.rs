//! Validation of user input: names, sizes, pool paths.

use std::path::Path;

use crate::error::ControlError;

/// Names of pools and volumes: they appear in NBD export names, file names and
/// URLs, so they are kept to a safe alphabet.
pub fn name(kind: &'static str, name: &str) -> Result<(), ControlError> {
    let bad = |why: &str| {
        Err(ControlError::InvalidName {
            kind,
            name: name.to_string(),
            why: why.into(),
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 64 {
        return bad("it is longer than 64 characters");
    }
    if !name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        return bad("it must start with a letter or digit");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return bad(&format!(
            "character {c:?} is not allowed (use letters, digits, '-', '_', '.')"
        ));
    }
    Ok(())
}

/// Parse a size such as `1G`, `512MiB`, `64k`, `1048576` (binary multiples:
/// storage administrators mean 1 GiB by 1G, as qemu-img and lvcreate do).
pub fn parse_size(input: &str) -> Result<u64, ControlError> {
    let err = |why: &str| ControlError::InvalidSize {
        input: input.to_string(),
        why: why.into(),
    };
    let s = input.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(err("it does not start with a number"));
    }
    let n: u64 = num.parse().map_err(|_| err("the number is too large"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return Err(err(&format!("unknown unit {unit:?}"))),
    };
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| err("it overflows 64 bits"))?;
    if bytes == 0 {
        return Err(err("a volume cannot be empty"));
    }
    Ok(bytes)
}

/// Human size with binary units, e.g. `1.0 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A pool path must be an existing, writable directory.
pub fn pool_path(path: &Path) -> Result<(), ControlError> {
    let meta =
        std::fs::metadata(path).map_err(|_| ControlError::PoolPathMissing(path.to_path_buf()))?;
    if !meta.is_dir() {
        return Err(ControlError::PoolPathNotDirectory(path.to_path_buf()));
    }
    let probe = path.join(format!(".ditto-write-test-{}", std::process::id()));
    match std::fs::write(&probe, b"ditto") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(ControlError::PoolPathNotWritable {
            path: path.to_path_buf(),
            why: e.to_string(),
        }),
    }
}

/// A node name: a DNS label (lowercase letters, digits, '-', 1 to 63
/// characters, no '-' at either end), since it is its certificate's name.
pub fn node_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "node name {name:?}: use 1 to 63 lowercase letters, digits and '-' (not at either end)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size(" 2 T ").unwrap(), 2 << 40);
        for bad in [
            "",
            "G",
            "12X",
            "0",
            "-1G",
            "99999999999999999999",
            "16777216T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(format_size(1 << 30), "1.0 GiB");
        assert_eq!(format_size(512), "512 B");
    }

    #[test]
    fn names() {
        for good in ["demo", "vm-1", "a.b_c", "0"] {
            assert!(name("volume", good).is_ok(), "{good}");
        }
        for bad in ["", "a/b", "a b", "-x", ".hidden", "é", &"x".repeat(65)] {
            assert!(name("volume", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pool_paths() {
        let dir = tempfile::tempdir().unwrap();
        assert!(pool_path(dir.path()).is_ok());
        assert!(matches!(
            pool_path(&dir.path().join("nope")),
            Err(ControlError::PoolPathMissing(_))
        ));
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            pool_path(&file),
            Err(ControlError::PoolPathNotDirectory(_))
        ));
    }
}
