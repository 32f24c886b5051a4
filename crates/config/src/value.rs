//! Why one value cannot be used. The text goes after the key path it is
//! about (`log.level "warning": …`), so it never names the key itself.

use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

/// What `log.level` accepts, repeated in each of its errors.
const LOG_LEVELS: &str =
    "use error, warn, info, debug or trace, or a filter like \"info,relay_delivery=debug\"";

/// Why a value is not one its key accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A word that names none of a setting's choices; `what` carries its
    /// article ("a mode"), `choices` the words to use instead.
    #[error("{value:?} is not {what}: use {choices}")]
    Unknown {
        value: String,
        what: &'static str,
        choices: &'static str,
    },
    /// `${` without its `}`.
    #[error("{text:?}: unclosed ${{")]
    UnclosedVariable { text: String },
    /// `${NAME}` where `NAME` is not in the environment.
    #[error("{text:?}: environment variable {name} is not set")]
    UnsetVariable { text: String, name: String },
    /// An IP address where an address with a port is needed.
    #[error("add a port, e.g. {}", SocketAddr::new(*.0, 2525))]
    NoPort(IpAddr),
    /// Neither an address with a port nor an IP address.
    #[error("not an address with a port, e.g. 127.0.0.1:2525 or [::1]:2525")]
    NotSocketAddr,
    /// An IP address where a network is needed.
    #[error("an address, not a network: write {} for this host alone", IpNet::from(*.0))]
    HostNotNetwork(IpAddr),
    /// Neither a network nor an IP address.
    #[error("not a network (CIDR), e.g. 192.168.10.0/24")]
    NotNetwork,
    /// A network whose prefix length is out of range.
    #[error("the prefix length {prefix:?} is not a number from 0 to {max}")]
    PrefixLength { prefix: String, max: u8 },
    /// A network whose address is not an IP address.
    #[error("{0:?} is not an IP address")]
    NotIpAddress(String),
    /// An authority without `https://`.
    #[error("has no scheme: write https://{0}")]
    NoScheme(String),
    /// An authority that is not a URL.
    #[error(transparent)]
    Url(#[from] url::ParseError),
    /// An authority URL without a host.
    #[error("has no host")]
    NoHost,
    /// An authority that is neither https nor on loopback.
    #[error("must be an https:// URL")]
    NotHttps,
    /// An empty `log.level`.
    #[error("is empty: {usage}", usage = LOG_LEVELS)]
    EmptyLogLevel,
    /// A `log.level` directive with a word that is not a level.
    #[error("{0:?} is not a level: {usage}", usage = LOG_LEVELS)]
    NotLogLevel(String),
}

#[cfg(test)]
mod tests {
    use super::ValueError;

    /// The texts admins see, word for word.
    #[test]
    fn texts() {
        let cases = [
            (
                ValueError::Unknown {
                    value: "none".into(),
                    what: "a security mode",
                    choices: r#""starttls" or "tls" (there is no plaintext mode)"#,
                },
                r#""none" is not a security mode: use "starttls" or "tls" (there is no plaintext mode)"#,
            ),
            (
                ValueError::UnclosedVariable {
                    text: "${A/b".into(),
                },
                r#""${A/b": unclosed ${"#,
            ),
            (
                ValueError::UnsetVariable {
                    text: "${A}/b".into(),
                    name: "A".into(),
                },
                r#""${A}/b": environment variable A is not set"#,
            ),
            (
                ValueError::NoPort("10.0.0.1".parse().unwrap()),
                "add a port, e.g. 10.0.0.1:2525",
            ),
            (
                ValueError::NoPort("::1".parse().unwrap()),
                "add a port, e.g. [::1]:2525",
            ),
            (
                ValueError::HostNotNetwork("10.0.0.1".parse().unwrap()),
                "an address, not a network: write 10.0.0.1/32 for this host alone",
            ),
            (
                ValueError::HostNotNetwork("fd00::1".parse().unwrap()),
                "an address, not a network: write fd00::1/128 for this host alone",
            ),
            (
                ValueError::PrefixLength {
                    prefix: "33".into(),
                    max: 32,
                },
                r#"the prefix length "33" is not a number from 0 to 32"#,
            ),
            (
                ValueError::NotIpAddress("10.0.0".into()),
                r#""10.0.0" is not an IP address"#,
            ),
            (
                ValueError::NoScheme("login.example".into()),
                "has no scheme: write https://login.example",
            ),
            (
                ValueError::EmptyLogLevel,
                r#"is empty: use error, warn, info, debug or trace, or a filter like "info,relay_delivery=debug""#,
            ),
            (
                ValueError::NotLogLevel("warning".into()),
                r#""warning" is not a level: use error, warn, info, debug or trace, or a filter like "info,relay_delivery=debug""#,
            ),
        ];
        for (error, text) in cases {
            assert_eq!(error.to_string(), text);
        }
    }
}
