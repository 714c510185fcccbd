//! A planted corpus for secret scanners: one secret of each kind the
//! scanner's rules know, in ordinary files, with their lines; and a large
//! generated tree around copies of it (for the benchmark). Values are made
//! at run time from a fixed generator: no real credential, none written in
//! the sources.

use std::path::Path;

/// A random-looking string from `alphabet` (a fixed LCG: the same every run).
pub fn rnd(seed: u64, alphabet: &str, len: usize) -> String {
    let a: Vec<char> = alphabet.chars().collect();
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            a[((x >> 33) % a.len() as u64) as usize]
        })
        .collect()
}

/// Letters and digits.
pub const ALNUM: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/// Upper-case letters and digits.
pub const UPPER: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
/// The base64 alphabet.
pub const B64: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// A well-formed JWT (HS256 header, a JSON payload naming `subject`,
/// base64url without padding) with a made-up signature.
fn jwt(subject: &str, signature: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{signature}",
        b64.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        b64.encode(format!(r#"{{"sub":"{subject}","iat":1516239022}}"#))
    )
}

/// (file, rule, text with the secret, secret) for every rule.
pub fn planted() -> Vec<(String, &'static str, String, String)> {
    let s = |seed, alpha, len| rnd(seed, alpha, len);
    let items: Vec<(&str, &str, String, String)> = vec![
        (
            "config/aws.ini",
            "aws-access-key-id",
            format!("AKIA{}", s(1, UPPER, 16)),
            "aws_access_key_id = {}".into(),
        ),
        (
            "config/aws.ini",
            "aws-secret-access-key",
            s(2, B64, 40),
            "aws_secret_access_key = \"{}\"".into(),
        ),
        (
            "ci/github.env",
            "github-token",
            format!("ghp_{}", s(3, ALNUM, 36)),
            "GITHUB_TOKEN={}".into(),
        ),
        (
            "ci/gitlab.env",
            "gitlab-token",
            format!("glpat-{}", s(4, ALNUM, 20)),
            "token: {}".into(),
        ),
        (
            "app/slack.py",
            "slack-token",
            format!("xoxb-{}-{}", s(5, "0123456789", 12), s(6, ALNUM, 24)),
            "SLACK = '{}'".into(),
        ),
        (
            "app/slack.py",
            "slack-webhook",
            format!(
                "https://hooks.slack.com/services/T{}/B{}/{}",
                s(7, UPPER, 10),
                s(8, UPPER, 10),
                s(9, ALNUM, 24)
            ),
            "HOOK = '{}'".into(),
        ),
        (
            "app/pay.rb",
            "stripe-key",
            format!("sk_live_{}", s(10, ALNUM, 24)),
            "Stripe.api_key = '{}'".into(),
        ),
        (
            "web/maps.js",
            "google-api-key",
            format!("AIza{}", s(11, ALNUM, 35)),
            "const key = \"{}\";".into(),
        ),
        (
            "keys/id_rsa",
            "private-key",
            "-----BEGIN RSA PRIVATE KEY-----".into(),
            "{}\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----".into(),
        ),
        (
            "web/session.txt",
            "jwt",
            jwt(&s(12, ALNUM, 16), &s(13, ALNUM, 43)),
            "Authorization: Bearer {}".into(),
        ),
        (
            "deploy/db.yaml",
            "connection-string-password",
            s(14, ALNUM, 14),
            "url: postgres://app:{}@db.internal:5432/app".into(),
        ),
        (
            "home/.npmrc",
            "npm-token",
            format!("npm_{}", s(15, ALNUM, 36)),
            "//registry.npmjs.org/:_authToken={}".into(),
        ),
        (
            "home/.pypirc",
            "pypi-token",
            format!("pypi-AgEIcHlwaS5vcmc{}", s(16, ALNUM, 60)),
            "password = {}".into(),
        ),
        (
            "app/mail.go",
            "sendgrid-key",
            format!("SG.{}.{}", s(17, ALNUM, 22), s(18, ALNUM, 43)),
            "key := \"{}\"".into(),
        ),
        (
            "app/sms.php",
            "twilio-key",
            format!("SK{}", s(19, "0123456789abcdef", 32)),
            "$sid = '{}';".into(),
        ),
        (
            "deploy/azure.conf",
            "azure-storage-key",
            format!("{}==", s(20, B64, 86)),
            "DefaultEndpointsProtocol=https;AccountName=x;AccountKey={};".into(),
        ),
        (
            "app/settings.py",
            "generic-secret",
            s(21, ALNUM, 28),
            "CLIENT_SECRET = \"{}\"".into(),
        ),
    ];
    items
        .into_iter()
        .map(|(file, rule, secret, line)| {
            (
                file.to_string(),
                rule,
                line.replace("{}", &secret) + "\n",
                secret,
            )
        })
        .collect()
}

/// Writes the planted tree under `root`; returns (file, rule, line, secret).
pub fn write_tree(root: &Path) -> Vec<(String, String, usize, String)> {
    let mut planted_list = Vec::new();
    let mut contents: std::collections::BTreeMap<String, String> = Default::default();
    for (file, rule, text, secret) in planted() {
        let body = contents.entry(file.clone()).or_default();
        body.push_str("# an ordinary line\nname = \"service\"\n");
        let line = body.lines().count() + 1;
        body.push_str(&text);
        planted_list.push((file, rule.to_string(), line, secret));
    }
    for (file, body) in &contents {
        let p = root.join(file);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    // A binary and a clean file.
    std::fs::write(
        root.join("app/logo.png"),
        [0x89u8, b'P', b'N', b'G', 0, 0, 1, 2],
    )
    .unwrap();
    std::fs::write(
        root.join("README.md"),
        "password = \"changeme\"\ntoken: ${TOKEN}\n",
    )
    .unwrap();
    planted_list
}

/// A tree of about `bytes` bytes: filler source files (code-like lines,
/// no secrets) and `copies` copies of the planted tree in `planted-<n>/`.
/// Returns every planted (file, rule, line, secret).
pub fn write_corpus(
    root: &Path,
    bytes: u64,
    copies: usize,
) -> Vec<(String, String, usize, String)> {
    let mut all = Vec::new();
    for c in 0..copies {
        let dir = format!("planted-{c}");
        for (file, rule, line, secret) in write_tree(&root.join(&dir)) {
            all.push((format!("{dir}/{file}"), rule, line, secret));
        }
    }
    let line_words = [
        "let", "value", "=", "compute(", "items", ",", "config", ")", ";", "// note:", "return",
        "total", "if", "else", "fn", "name",
    ];
    let mut written = 0u64;
    let mut n = 0u64;
    while written < bytes {
        let mut body = String::with_capacity(32 << 10);
        let mut x = n.wrapping_mul(2654435761).wrapping_add(1);
        while body.len() < 32 << 10 {
            for _ in 0..8 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                body.push_str(line_words[((x >> 33) % line_words.len() as u64) as usize]);
                body.push(' ');
            }
            body.push_str(&format!("id_{}\n", x % 100_000));
        }
        let dir = root.join(format!("src-{}", n / 100));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(format!("module_{n}.rs")), &body).expect("write");
        written += body.len() as u64;
        n += 1;
    }
    all
}
