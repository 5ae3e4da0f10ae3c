//! The sort key stored beside an agent's version, so the database can compare versions
//! by semver precedence (`older_than`, sorting by version) without reading every agent.
//! Keys compare by bytes exactly as their versions compare by precedence; build
//! metadata does not count, as semver says.

/// The key of a version; empty for a version that is not semver (it sorts before every
/// semver version and is older than none).
pub fn version_key(version: &str) -> String {
    semver::Version::parse(version)
        .ok()
        .and_then(|v| key_of(&v))
        .unwrap_or_default()
}

/// `major.minor.patch` as fixed-width numbers, then `0` and the pre-release identifiers
/// or `1` for a release (a release follows its pre-releases). A numeric identifier is
/// `1`, its length in three digits and its digits (no leading zeros, so longer is
/// larger); an alphanumeric one is `2`, its text and `!` (below every character an
/// identifier may hold, so a prefix sorts first). Numeric sorts before alphanumeric,
/// and fewer identifiers before more when the shared ones are equal.
fn key_of(v: &semver::Version) -> Option<String> {
    let mut key = format!("{:020}.{:020}.{:020}", v.major, v.minor, v.patch);
    if v.pre.is_empty() {
        key.push('1');
        return Some(key);
    }
    key.push('0');
    for ident in v.pre.as_str().split('.') {
        if !ident.is_empty() && ident.bytes().all(|b| b.is_ascii_digit()) {
            if ident.len() > 999 {
                return None;
            }
            key.push_str(&format!("1{:03}{ident}", ident.len()));
        } else {
            key.push('2');
            key.push_str(ident);
            key.push('!');
        }
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ident() -> impl Strategy<Value = String> {
        prop_oneof![
            (0u64..30).prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            "[0-9A-Za-z-]{1,6}".prop_filter("numeric with a leading zero", |s| {
                !(s.len() > 1 && s.starts_with('0') && s.bytes().all(|b| b.is_ascii_digit()))
            }),
        ]
    }

    fn version() -> impl Strategy<Value = semver::Version> {
        let number = prop_oneof![0u64..4, any::<u64>()];
        (
            number.clone(),
            number.clone(),
            number,
            proptest::collection::vec(ident(), 0..4),
            proptest::option::of("[0-9A-Za-z]{1,4}"),
        )
            .prop_map(|(major, minor, patch, pre, build)| {
                let mut text = format!("{major}.{minor}.{patch}");
                if !pre.is_empty() {
                    text = format!("{text}-{}", pre.join("."));
                }
                if let Some(build) = build {
                    text = format!("{text}+{build}");
                }
                semver::Version::parse(&text).expect("a generated version parses")
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn key_order_is_semver_precedence(a in version(), b in version()) {
            let (ka, kb) = (version_key(&a.to_string()), version_key(&b.to_string()));
            prop_assert!(!ka.is_empty() && !kb.is_empty());
            prop_assert_eq!(ka.as_bytes().cmp(kb.as_bytes()), a.cmp_precedence(&b), "{} vs {}", a, b);
        }

        #[test]
        fn a_version_and_its_pre_release_share_a_prefix_order(a in version()) {
            let release = semver::Version::new(a.major, a.minor, a.patch);
            prop_assert!(version_key(&a.to_string()) <= version_key(&release.to_string()));
        }
    }

    #[test]
    fn the_semver_examples_sort_in_order() {
        let order = [
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
            "1.0.1",
            "1.2.0",
            "1.10.0",
            "2.0.0",
        ];
        for pair in order.windows(2) {
            assert!(version_key(pair[0]) < version_key(pair[1]), "{pair:?}");
        }
        assert_eq!(version_key("1.0.0+abc"), version_key("1.0.0"));
    }

    #[test]
    fn a_version_that_is_not_semver_has_the_empty_key() {
        for text in ["", "dev", "1.0", "v1.0.0", "1.0.0-01"] {
            assert_eq!(version_key(text), "", "{text}");
        }
        assert!(version_key("") < version_key("0.0.0-0"));
    }
}
