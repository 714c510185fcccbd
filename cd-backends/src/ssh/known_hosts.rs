//! known_hosts matching as OpenSSH does it (sshd(8), "SSH_KNOWN_HOSTS FILE
//! FORMAT"): comma-separated host patterns with `*` and `?` wildcards and
//! `!` negation, `[host]:port` for other ports than 22, hashed names
//! (`|1|salt|hmac`), any run of blanks between fields, `#` comments,
//! several keys per host (key rotation), and the `@revoked` marker: a
//! revoked key is refused even where another line lists it.
//! `@cert-authority` lines are skipped (the deployer does not accept host
//! certificates). Lines that do not parse are skipped, as OpenSSH does.

use hmac::{KeyInit, Mac};
use russh::keys::PublicKey;

/// What the file says of one host's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A line for the host lists this key.
    Known,
    /// No line for the host has a key of this type.
    Unknown,
    /// The host has a key of this type, and it is another one (`line`: the
    /// first such line, from 1).
    Changed { line: usize },
    /// An `@revoked` line for the host lists this key.
    Revoked { line: usize },
}

/// Checks `key` presented by `host` on `port` against known_hosts `text`.
pub(crate) fn check(text: &str, host: &str, port: u16, key: &PublicKey) -> Verdict {
    let name = if port == 22 {
        host.to_ascii_lowercase()
    } else {
        format!("[{}]:{port}", host.to_ascii_lowercase())
    };
    let mut known = false;
    let mut changed = None;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let Some(entry) = Entry::parse(raw) else {
            continue;
        };
        if !entry.matches(&name) {
            continue;
        }
        let Ok(recorded) = russh::keys::parse_public_key_base64(entry.key) else {
            continue;
        };
        match entry.marker {
            Some(Marker::Revoked) if recorded == *key => return Verdict::Revoked { line },
            Some(_) => {}
            None if recorded == *key => known = true,
            None if recorded.algorithm() == key.algorithm() => {
                changed.get_or_insert(line);
            }
            None => {}
        }
    }
    match (known, changed) {
        (true, _) => Verdict::Known,
        (false, Some(line)) => Verdict::Changed { line },
        (false, None) => Verdict::Unknown,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    Revoked,
    CertAuthority,
}

/// One line's fields.
struct Entry<'a> {
    marker: Option<Marker>,
    hosts: &'a str,
    key: &'a str,
}

impl<'a> Entry<'a> {
    fn parse(raw: &'a str) -> Option<Self> {
        let text = raw.trim_start();
        if text.is_empty() || text.starts_with('#') {
            return None;
        }
        let mut fields = text.split_ascii_whitespace();
        let mut first = fields.next()?;
        let marker = match first {
            "@revoked" => Some(Marker::Revoked),
            "@cert-authority" => Some(Marker::CertAuthority),
            m if m.starts_with('@') => return None,
            _ => None,
        };
        if marker.is_some() {
            first = fields.next()?;
        }
        let _key_type = fields.next()?;
        let key = fields.next()?;
        Some(Entry {
            marker,
            hosts: first,
            key,
        })
    }

    /// OpenSSH's rule: some pattern matches and no negated one does.
    fn matches(&self, name: &str) -> bool {
        let mut matched = false;
        for pattern in self.hosts.split(',') {
            if let Some(hashed) = pattern.strip_prefix("|1|") {
                matched |= hashed_matches(hashed, name);
            } else if let Some(negated) = pattern.strip_prefix('!') {
                if wildcard(&negated.to_ascii_lowercase(), name) {
                    return false;
                }
            } else {
                matched |= wildcard(&pattern.to_ascii_lowercase(), name);
            }
        }
        matched
    }
}

/// `salt|hmac` (both base64): HMAC-SHA1 of the name keyed with the salt.
fn hashed_matches(hashed: &str, name: &str) -> bool {
    use data_encoding::BASE64;
    let mut parts = hashed.split('|');
    let (Some(salt), Some(hash)) = (parts.next(), parts.next()) else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (
        BASE64.decode(salt.as_bytes()),
        BASE64.decode(hash.as_bytes()),
    ) else {
        return false;
    };
    let Ok(mac) = hmac::Hmac::<sha1::Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.chain_update(name.as_bytes())
        .verify_slice(&hash)
        .is_ok()
}

/// Glob match with `*` (any run) and `?` (any one character).
fn wildcard(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{KeyInit, Mac};

    // Public halves of two throwaway ed25519 keys.
    const K1: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIEmu7z8L69NUj6ZW4swq5yI3z5JWYMaBG58KbPfEVkI7";
    const K2: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIKKSLvQvrVXVR8BmmFieyGSJw72CALvQV4fhMBcElXQk";

    fn key(b64: &str) -> PublicKey {
        russh::keys::parse_public_key_base64(b64).unwrap()
    }

    #[test]
    fn plain_names_ports_and_blanks() {
        let text = format!(
            "# comment\n\n  web1,web2\tssh-ed25519  {K1} a comment\n[web3]:2222 ssh-ed25519 {K1}\n"
        );
        assert_eq!(check(&text, "web1", 22, &key(K1)), Verdict::Known);
        assert_eq!(check(&text, "WEB2", 22, &key(K1)), Verdict::Known);
        assert_eq!(check(&text, "web3", 2222, &key(K1)), Verdict::Known);
        assert_eq!(check(&text, "web3", 22, &key(K1)), Verdict::Unknown);
        assert_eq!(check(&text, "web1", 2222, &key(K1)), Verdict::Unknown);
        assert_eq!(
            check(&text, "web1", 22, &key(K2)),
            Verdict::Changed { line: 3 }
        );
    }

    #[test]
    fn wildcards_and_negation() {
        let text = format!(
            "*.prod.example,!db.prod.example ssh-ed25519 {K1}\n[10.0.0.?]:2200 ssh-ed25519 {K1}\n"
        );
        assert_eq!(
            check(&text, "app.prod.example", 22, &key(K1)),
            Verdict::Known
        );
        assert_eq!(
            check(&text, "db.prod.example", 22, &key(K1)),
            Verdict::Unknown
        );
        assert_eq!(check(&text, "10.0.0.7", 2200, &key(K1)), Verdict::Known);
        assert_eq!(check(&text, "10.0.0.17", 2200, &key(K1)), Verdict::Unknown);
        assert!(wildcard("a*b*c", "aXXbYc"));
        assert!(!wildcard("a*b*c", "aXXbY"));
        assert!(wildcard("*", ""));
    }

    #[test]
    fn hashed_names() {
        use data_encoding::BASE64;
        let salt = b"0123456789abcdef0123";
        let mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(salt)
            .unwrap()
            .chain_update(b"[127.0.0.2]:2201")
            .finalize()
            .into_bytes();
        let text = format!(
            "|1|{}|{} ssh-ed25519 {K1}\n",
            BASE64.encode(salt),
            BASE64.encode(&mac)
        );
        assert_eq!(check(&text, "127.0.0.2", 2201, &key(K1)), Verdict::Known);
        assert_eq!(check(&text, "127.0.0.3", 2201, &key(K1)), Verdict::Unknown);
    }

    #[test]
    fn rotation_revocation_and_markers() {
        // Two keys for one host (rotation): either is accepted.
        let text = format!("web ssh-ed25519 {K2}\nweb ssh-ed25519 {K1}\n");
        assert_eq!(check(&text, "web", 22, &key(K1)), Verdict::Known);
        assert_eq!(check(&text, "web", 22, &key(K2)), Verdict::Known);
        // Revoked wins over a line that lists the same key.
        let text = format!("web ssh-ed25519 {K1}\n@revoked * ssh-ed25519 {K1}\n");
        assert_eq!(
            check(&text, "web", 22, &key(K1)),
            Verdict::Revoked { line: 2 }
        );
        // A revoked line for another key changes nothing for this one.
        let text = format!("web ssh-ed25519 {K1}\n@revoked * ssh-ed25519 {K2}\n");
        assert_eq!(check(&text, "web", 22, &key(K1)), Verdict::Known);
        // A CA line is not a host key; unknown markers and junk are skipped.
        let text = format!(
            "@cert-authority * ssh-ed25519 {K1}\n@other web ssh-ed25519 {K1}\nweb ssh-ed25519 not-base64\nweb\n"
        );
        assert_eq!(check(&text, "web", 22, &key(K1)), Verdict::Unknown);
    }
}
