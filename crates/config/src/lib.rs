//! The relay's configuration: the TOML schema, loading it (file plus
//! `SMTP_OAUTH_RELAY__…` environment overrides, through the `config` crate),
//! and validating it.
//!
//! The doc comments on the structs below are the reference documentation of
//! every key; `config/smtp-oauth-relay.toml` shows them in use. Unknown keys
//! are errors, and every error names the key path it is about, e.g.
//! `accounts[0].oauth.tenant_id is missing`.

mod database_url;
mod load;
mod schema;
mod secret;
mod state;
mod validate;
mod value;

pub use database_url::DatabaseUrl;
pub use load::{load_file, load_file_with, load_str, ConfigError, Secrets, ENV_PREFIX};
pub use schema::*;
pub use secret::Secret;
pub use state::{create_private_dir, file_name, StateDir};
pub use validate::{decode_cache_key, warnings};
pub use value::ValueError;
