use serde::{Deserialize, Serialize, Serializer};
use std::fmt;

/// `queue.database_url`, taken apart once when the configuration is read:
/// the URL as written (for connecting), the same with any password masked
/// (for people: `Display`, `Debug`, `config show`), and the server and
/// database it names (for errors, `/readyz` and `doctor`).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub struct DatabaseUrl {
    url: String,
    shown: String,
    has_password: bool,
    place: String,
    readable: bool,
}

impl DatabaseUrl {
    /// The URL as written, password included: only for connecting.
    pub fn expose(&self) -> &str {
        &self.url
    }

    /// Whether it is a PostgreSQL URL (`postgres://` or `postgresql://`).
    pub fn is_postgres(&self) -> bool {
        ["postgres://", "postgresql://"]
            .iter()
            .any(|scheme| self.url.starts_with(scheme))
    }

    /// Whether a password is written in it (`user:password@`, or a
    /// `password=` parameter).
    pub fn has_password(&self) -> bool {
        self.has_password
    }

    /// Whether it can be taken apart as a URL. A `/` or `?` written raw in
    /// a password ends the host part early; then where the password ends
    /// cannot be told, and all of the URL after the scheme is masked.
    pub fn is_readable(&self) -> bool {
        self.readable
    }

    /// The server and database, without user, password or options:
    /// `host:port/database`, or `DIR (socket)/database` for a local socket
    /// named by the `host` parameter.
    pub fn place(&self) -> &str {
        &self.place
    }
}

impl From<String> for DatabaseUrl {
    fn from(url: String) -> Self {
        let (scheme, rest) = url
            .find("://")
            .map_or(("", url.as_str()), |at| (&url[..at + 3], &url[at + 3..]));
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((userinfo, host)) => (Some(userinfo), host),
            None => (None, authority),
        };
        // The rest of a password cut short, and the `@` after it, land in
        // the path or in the query's first name.
        let query_first_name = query.and_then(|q| q.split('&').next()?.split('=').next());
        let cut_short = userinfo.is_none()
            && (path.contains('@') || query_first_name.is_some_and(|name| name.contains('@')));
        if cut_short {
            return DatabaseUrl {
                shown: format!("{scheme}[redacted]"),
                has_password: true,
                place: "[redacted]".into(),
                readable: false,
                url,
            };
        }
        let mut has_password = false;
        let userinfo = userinfo.map(|userinfo| match userinfo.split_once(':') {
            Some((user, _)) => {
                has_password = true;
                format!("{user}:[redacted]@")
            }
            None => format!("{userinfo}@"),
        });
        let mut socket = None;
        let query = query.map(|query| {
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                        has_password = true;
                        format!("{key}=[redacted]")
                    }
                    Some(("host", dir)) if host.is_empty() => {
                        socket = Some(dir);
                        pair.to_owned()
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            format!("?{}", pairs.join("&"))
        });
        let shown = format!(
            "{scheme}{}{host}{path}{}",
            userinfo.unwrap_or_default(),
            query.unwrap_or_default()
        );
        let place = match socket {
            Some(dir) => format!("{dir} (socket){path}"),
            None => format!("{host}{path}"),
        };
        DatabaseUrl {
            shown,
            has_password,
            place,
            readable: true,
            url,
        }
    }
}

impl From<&str> for DatabaseUrl {
    fn from(url: &str) -> Self {
        DatabaseUrl::from(url.to_owned())
    }
}

/// With any password masked.
impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// With any password masked.
impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.shown, f)
    }
}

/// Printed configurations mask the password.
impl Serialize for DatabaseUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.shown)
    }
}

#[cfg(test)]
mod tests {
    use super::DatabaseUrl;

    fn parts(url: &str) -> (String, bool, String) {
        let url = DatabaseUrl::from(url);
        (url.to_string(), url.has_password(), url.place().to_owned())
    }

    #[test]
    fn passwords_are_found_and_masked() {
        let url = "postgres://relay@db.example.com:5432/relay?sslmode=verify-full";
        assert_eq!(
            parts(url),
            (url.into(), false, "db.example.com:5432/relay".into())
        );
        assert_eq!(
            parts("postgres://relay:hunter2@db:5432/relay"),
            (
                "postgres://relay:[redacted]@db:5432/relay".into(),
                true,
                "db:5432/relay".into()
            )
        );
        assert_eq!(
            parts("postgresql://db/relay?user=relay&password=hunter2&sslmode=require"),
            (
                "postgresql://db/relay?user=relay&password=[redacted]&sslmode=require".into(),
                true,
                "db/relay".into()
            )
        );
        assert_eq!(
            parts("postgres://relay:p@ss@db?x=1"),
            (
                "postgres://relay:[redacted]@db?x=1".into(),
                true,
                "db".into()
            )
        );
        let url = DatabaseUrl::from("postgres://relay:hunter2@db/relay");
        assert_eq!(
            format!("{url:?}"),
            "\"postgres://relay:[redacted]@db/relay\""
        );
        assert_eq!(url.expose(), "postgres://relay:hunter2@db/relay");
    }

    #[test]
    fn a_password_cut_short_by_a_raw_slash_or_question_mark_is_masked_whole() {
        for url in [
            "postgres://relay:hun/ter2@db:5432/relay",
            "postgres://relay:hun?ter2@db:5432/relay",
            "postgres://relay:12/34@db/relay",
        ] {
            let parsed = DatabaseUrl::from(url);
            assert!(!parsed.is_readable(), "{url}");
            assert_eq!(
                parts(url),
                ("postgres://[redacted]".into(), true, "[redacted]".into())
            );
        }
        // an `@` in a query value is not a password's
        let url = "postgres://db/relay?user=relay@corp&sslmode=require";
        assert!(DatabaseUrl::from(url).is_readable());
        assert_eq!(parts(url).0, url);
    }

    #[test]
    fn a_local_socket_is_named_by_its_directory() {
        assert_eq!(
            parts("postgres:///relay?user=relay&host=/run/postgresql").2,
            "/run/postgresql (socket)/relay"
        );
    }

    #[test]
    fn only_postgres_schemes_are_postgres() {
        for (url, postgres) in [
            ("postgres://db/relay", true),
            ("postgresql://db/relay", true),
            ("mysql://db/relay", false),
            ("db.example.com", false),
        ] {
            assert_eq!(DatabaseUrl::from(url).is_postgres(), postgres, "{url}");
        }
    }
}
