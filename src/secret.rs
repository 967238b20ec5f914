//! Secrets (server passwords, deploy keys): read from an environment variable the user names,
//! sent where they belong, never printed, logged or written into an event.

/// A secret read from the environment: printed as `***`, never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// Reads the variable the user named. An unset or empty variable is an error that names
    /// the variable (never its value), because a password the user asked for and forgot to
    /// export would otherwise fail later as a confusing 401.
    pub fn from_env(var: &str) -> Result<Self, String> {
        match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(Self(v)),
            Ok(_) => Err(format!("environment variable {var} is empty")),
            Err(_) => Err(format!("environment variable {var} is not set")),
        }
    }

    /// A fresh random secret: 256 bits from the operating system's CSPRNG, as 64 hex digits
    /// (a password for a server the worker spawns, a bearer token).
    pub fn random() -> Self {
        use rand::TryRngCore;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut bytes)
            .expect("the operating system's random source works");
        Self(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints_and_a_missing_variable_is_named() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "Secret(***)");
        let err = Secret::from_env("AGENTSYNC_TEST_SURELY_UNSET_VAR").unwrap_err();
        assert_eq!(
            err,
            "environment variable AGENTSYNC_TEST_SURELY_UNSET_VAR is not set"
        );
    }

    #[test]
    fn random_secrets_are_long_and_distinct() {
        let (a, b) = (Secret::random(), Secret::random());
        assert_eq!(a.expose().len(), 64);
        assert!(a.expose().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
