//! VM names: valid hostnames, generated in the style `calm-otter` when absent.

use crate::HostError;

const ADJECTIVES: [&str; 32] = [
    "calm", "brave", "bright", "brisk", "clever", "cosy", "crisp", "eager", "fair", "fond",
    "gentle", "glad", "golden", "happy", "jolly", "keen", "kind", "lively", "lucky", "merry",
    "mild", "nimble", "noble", "proud", "quick", "quiet", "swift", "tidy", "vivid", "warm", "wise",
    "witty",
];
const ANIMALS: [&str; 32] = [
    "otter", "badger", "beaver", "bison", "crane", "dingo", "eagle", "falcon", "ferret", "gecko",
    "heron", "ibex", "jaguar", "koala", "lemur", "lynx", "marten", "newt", "ocelot", "panda",
    "puffin", "quail", "raven", "salmon", "stoat", "tapir", "toucan", "walrus", "weasel", "whale",
    "wombat", "yak",
];

/// Checks that `name` matches `[a-z0-9][a-z0-9-]{0,63}` (a valid hostname label).
pub fn validate_name(name: &str) -> Result<(), HostError> {
    let bad = |why| {
        Err(HostError::InvalidName {
            name: name.to_string(),
            why,
        })
    };
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return bad("it is empty");
    }
    if bytes.len() > 64 {
        return bad("longer than 64 characters");
    }
    if !(bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit()) {
        return bad("must start with a-z or 0-9");
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
    {
        return bad("only a-z, 0-9 and '-' are allowed");
    }
    Ok(())
}

/// A random name in the style `calm-otter`; `taken` says which names are in use.
pub fn generate_name(taken: impl Fn(&str) -> bool) -> String {
    for attempt in 0..64u32 {
        let r = random_u64();
        let base = format!(
            "{}-{}",
            ADJECTIVES[(r % 32) as usize],
            ANIMALS[((r >> 8) % 32) as usize]
        );
        // After many collisions, a numeric suffix keeps the style and guarantees progress.
        let name = if attempt < 16 {
            base
        } else {
            format!("{base}-{}", (r >> 16) % 10_000)
        };
        if !taken(&name) {
            return name;
        }
    }
    format!("vm-{}", random_u64() % 1_000_000_000)
}

fn random_u64() -> u64 {
    use std::io::Read;
    let mut buf = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok()
    {
        return u64::from_le_bytes(buf);
    }
    // No /dev/urandom: time and pid are random enough for a name.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "calm-otter", "vm1", "0", &"a".repeat(64)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "Calm", "a_b", "a.b", "a b", &"a".repeat(65), "é"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn generated_names_are_valid_and_avoid_taken() {
        let n = generate_name(|_| false);
        validate_name(&n).unwrap();
        assert_eq!(n.split('-').count(), 2, "{n}");
        let m = generate_name(|c| c.split('-').count() == 2);
        validate_name(&m).unwrap();
        assert_eq!(m.split('-').count(), 3, "{m}");
    }
}
