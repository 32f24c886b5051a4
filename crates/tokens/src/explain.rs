//! What the identity platform's AADSTS errors mean for someone setting up the
//! relay, in terms of the setup steps in the README.

/// A one-line explanation and fix for an AADSTS error number.
pub fn explain_aadsts(code: u32) -> Option<&'static str> {
    Some(match code {
        700016 => "the client_id is not an app registered in this tenant: check client_id and tenant_id (App registrations → Overview)",
        7000215 => "the client secret is wrong: paste the secret's Value, not its Secret ID (Certificates & secrets)",
        7000222 => "the client secret has expired: create a new one under Certificates & secrets and update the secret file",
        90002 => "the tenant was not found: tenant_id must be the Directory (tenant) ID or a verified domain",
        65001 => "admin consent is missing: grant admin consent for SMTP.SendAsApp under API permissions",
        70008 | 700082 => "the refresh token has expired: run `smtp-oauth-relay authorize` again",
        70043 => "Conditional Access sign-in frequency ended the session: run `smtp-oauth-relay authorize` again, or exclude the app from the policy",
        50076 | 50079 => "multi-factor authentication or Conditional Access blocks this sign-in: exclude the relay's app or sign in interactively",
        700027 | 700024 => "the client assertion was refused: check the certificate uploaded to the app registration and the system clock",
        1002012 | 70011 => "the scope is invalid: app-only tokens need https://outlook.office365.com/.default",
        900144 => "the token request was malformed",
        _ => return None,
    })
}
