//! Envelope sender → account. The most specific pattern wins: an exact
//! address, then `*@domain`, then `*`; among equals, the first account listed.

use relay_config::AccountConfig;

/// The sender patterns of every account, ready to match.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<(Specificity, String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Specificity {
    Anyone,
    Domain,
    Address,
}

impl Router {
    pub fn new(accounts: &[AccountConfig]) -> Self {
        let routes = accounts
            .iter()
            .flat_map(|account| {
                account.senders.iter().map(|pattern| {
                    let pattern = pattern.to_ascii_lowercase();
                    let specificity = if pattern == "*" {
                        Specificity::Anyone
                    } else if pattern.starts_with("*@") {
                        Specificity::Domain
                    } else {
                        Specificity::Address
                    };
                    (specificity, pattern, account.name.clone())
                })
            })
            .collect();
        Router { routes }
    }

    /// The account that sends mail from `sender` ("" is the null sender,
    /// which only `*` matches), if any.
    pub fn route(&self, sender: &str) -> Option<&str> {
        let sender = sender.to_ascii_lowercase();
        let domain = sender.rsplit_once('@').map(|(_, d)| d);
        let mut best: Option<(Specificity, &str)> = None;
        for (specificity, pattern, account) in &self.routes {
            let matches = match specificity {
                Specificity::Anyone => true,
                Specificity::Domain => domain == pattern.strip_prefix("*@"),
                Specificity::Address => *pattern == sender,
            };
            if matches && best.is_none_or(|(s, _)| *specificity > s) {
                best = Some((*specificity, account));
            }
        }
        best.map(|(_, account)| account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(name: &str, senders: &[&str]) -> AccountConfig {
        let toml = format!(
            "[[accounts]]\nname = \"{name}\"\nmailbox = \"{name}@contoso.com\"\nsenders = {senders:?}\n\
             [accounts.oauth]\nflow = \"client_credentials\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret = \"s\"\n"
        );
        let mut config = relay_config::load_str(&toml).expect("valid account");
        config.accounts.remove(0)
    }

    #[test]
    fn most_specific_wins() {
        let r = Router::new(&[
            account("all", &["*"]),
            account("sales", &["*@Sales.contoso.com"]),
            account("ceo", &["ceo@sales.contoso.com"]),
        ]);
        assert_eq!(r.route("CEO@sales.contoso.com"), Some("ceo"));
        assert_eq!(r.route("bob@sales.contoso.com"), Some("sales"));
        assert_eq!(r.route("bob@example.com"), Some("all"));
        assert_eq!(r.route(""), Some("all"));
        let only = Router::new(&[account("sales", &["*@sales.contoso.com"])]);
        assert_eq!(only.route("bob@example.com"), None);
        assert_eq!(only.route(""), None);
    }
}
