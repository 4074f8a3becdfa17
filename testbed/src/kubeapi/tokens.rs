//! Service-account tokens the double mints (TokenRequest, [`super::ApiServer::issue_token`])
//! and reviews (TokenReview): opaque random strings in a table, each with what it proves.
//!
//! (Stub: the signatures are the contract; see /work/helpers/s5/design.md.)

use serde_json::Value;

use super::TokenSpec;

/// Who a token authenticates as, for the double's own request handling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenUser {
    /// `system:serviceaccount:NS:SA`.
    pub username: String,
    /// The bound pod's name, if any.
    pub pod: Option<String>,
}

#[derive(Debug, Default)]
pub struct Tokens {
    _private: (),
}

impl Tokens {
    pub fn issue(&mut self, spec: TokenSpec) -> String {
        let _ = spec;
        unimplemented!()
    }
    /// The user a token authenticates as at `now` (unix seconds), for any audience.
    pub fn user(&self, token: &str, now: u64) -> Option<TokenUser> {
        let _ = (token, now);
        unimplemented!()
    }
    /// A TokenReview's `status` for `token`, asked for `audiences` (empty: the API server's
    /// own audience, which every token has) at `now`.
    pub fn review(&self, token: &str, audiences: &[String], now: u64) -> Value {
        let _ = (token, audiences, now);
        unimplemented!()
    }
}
