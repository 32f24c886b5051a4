//! What the identity platform's AADSTS errors mean for someone setting up the
//! relay, in terms of the setup steps in the README.

/// A one-line explanation and fix for an AADSTS error number.
pub fn explain_aadsts(code: u32) -> Option<&'static str> {
    Some(match code {
        700016 => "the client_id is not an app registered in this tenant: check client_id and tenant_id (App registrations → Overview)",
        7000215 => "the client secret is wrong: paste the secret's Value, not its Secret ID (Certificates & secrets)",
        7000222 => "the client secret has expired: create a new one under Certificates & secrets and update the secret file",
        7000218 => "the app is a confidential client: set client_secret_file (or a certificate), or enable \"Allow public client flows\" under Authentication",
        90002 => "the tenant was not found: tenant_id must be the Directory (tenant) ID or a verified domain, and authority the right cloud",
        65001 => "consent is missing: grant admin consent for the permission under API permissions (SMTP.SendAsApp for app-only, SMTP.Send for delegated)",
        70008 | 700082 => "the refresh token has expired: run `smtp-oauth-relay authorize` again",
        50173 | 700084 => "the refresh token was revoked (password change or admin action): run `smtp-oauth-relay authorize` again",
        70043 => "Conditional Access sign-in frequency ended the session: run `smtp-oauth-relay authorize` again, or exclude the app from the policy",
        50076 | 50079 => "multi-factor authentication or Conditional Access blocks this sign-in: run `smtp-oauth-relay authorize` interactively, or exclude the relay's app from the policy",
        50158 | 53003 => "a Conditional Access policy blocks this sign-in: exclude the relay's app or its network from the policy",
        700027 | 700024 => "the client assertion was refused: check that the certificate uploaded to the app registration is client_certificate, the key matches it, and the system clock is right",
        700023 => "the certificate is not registered on the app: upload client_certificate under Certificates & secrets",
        1002012 | 70011 => "the scope is invalid: app-only tokens need https://outlook.office365.com/.default, delegated ones https://outlook.office.com/SMTP.Send offline_access",
        7000112 => "the application is disabled in this tenant: enable it under Enterprise applications → Properties",
        50034 | 50126 => "the user or password is wrong: sign in as the mailbox owner",
        50020 => "the user is from another tenant: sign in with an account of the tenant, or set tenant_id to theirs",
        500113 | 50011 => "the redirect URI is not registered: add the platform \"Mobile and desktop applications\" with http://localhost under Authentication",
        900144 => "the token request was malformed",
        _ => return None,
    })
}

/// An explanation for an OAuth `error` value that carries no AADSTS number
/// (Google, or generic RFC 6749 errors).
pub fn explain_error(error: &str) -> Option<&'static str> {
    Some(match error {
        "invalid_scope" => "the scope is not allowed for this app: check `scope` (Microsoft app-only: https://outlook.office365.com/.default; delegated: https://outlook.office.com/SMTP.Send offline_access; Google: https://mail.google.com/) and the app's API permissions",
        "invalid_grant" => "the grant (refresh token, code or assertion) is no longer valid: run `smtp-oauth-relay authorize` again (service accounts: check domain-wide delegation for the client id and scope)",
        "unauthorized_client" => "this client may not use this grant: check the client id, its type, and (Google) domain-wide delegation in the Admin console",
        "invalid_client" => "the client credentials are wrong: check client_id and the secret or certificate",
        "access_denied" => "the user or an administrator declined the sign-in",
        "expired_token" => "the sign-in code expired before anyone used it: run `smtp-oauth-relay authorize` again and complete the sign-in in time",
        "authorization_declined" => "the user declined the sign-in",
        _ => return None,
    })
}
