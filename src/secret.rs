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
}
