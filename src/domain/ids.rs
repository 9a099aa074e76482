//! Identifiers, each a newtype that can only be built valid.
//!
//! `sku_id`, `user_id`, promotion `code` and `payment_ref` share the
//! contract's shape `[A-Za-z0-9_.-]{1,64}`. They are stored inline (no heap,
//! `Copy`), because they are copied into every event, order and map key on the
//! hot path. Deserialising (from JSON or from the journal) validates again, so
//! an invalid id can never enter the domain by any door.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::domain::DomainError;
use crate::limits::{ID_BYTES_MAX, IDEMPOTENCY_KEY_BYTES_MAX};

/// A validated id of 1..=64 bytes from `[A-Za-z0-9_.-]`, stored inline.
#[derive(Clone, Copy)]
pub struct Ident {
    len: u8,
    bytes: [u8; ID_BYTES_MAX],
}

const _: () = assert!(ID_BYTES_MAX <= u8::MAX as usize);

impl Ident {
    /// Builds an id, checking the contract's alphabet and length.
    ///
    /// # Errors
    /// `DomainError::Invalid` naming `what` when `text` is empty, too long or
    /// has a character outside `[A-Za-z0-9_.-]`.
    pub fn parse(what: &'static str, text: &str) -> Result<Ident, DomainError> {
        let raw = text.as_bytes();
        if raw.is_empty() || raw.len() > ID_BYTES_MAX {
            return Err(DomainError::invalid(format!(
                "{what} must be 1 to {ID_BYTES_MAX} characters"
            )));
        }
        if !raw
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return Err(DomainError::invalid(format!(
                "{what} may only contain A-Z, a-z, 0-9, '_', '.' and '-'"
            )));
        }
        let mut bytes = [0u8; ID_BYTES_MAX];
        bytes[..raw.len()].copy_from_slice(raw);
        // The length check above makes this conversion exact.
        let len = u8::try_from(raw.len()).map_err(|_| DomainError::invalid("id too long"))?;
        Ok(Ident { len, bytes })
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII bytes are ever stored (checked in `parse`).
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }

    /// The id's bytes (ASCII). Comparing and hashing use these: the same
    /// order as the text, without re-checking UTF-8 on every lookup.
    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl PartialEq for Ident {
    fn eq(&self, other: &Ident) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}
impl Eq for Ident {}
impl std::hash::Hash for Ident {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}
impl PartialOrd for Ident {
    fn partial_cmp(&self, other: &Ident) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ident {
    fn cmp(&self, other: &Ident) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}
impl fmt::Debug for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}
impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Declares a newtype over [`Ident`] with parsing, display and a validating
/// serde implementation.
macro_rules! ident_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Ident);

        impl $name {
            /// Parses and validates the id.
            ///
            /// # Errors
            /// `DomainError::Invalid` when the text is not a valid id.
            pub fn parse(text: &str) -> Result<$name, DomainError> {
                Ident::parse($what, text).map($name)
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<$name, D::Error> {
                struct IdVisitor;
                impl Visitor<'_> for IdVisitor {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str(concat!("a ", $what, " matching [A-Za-z0-9_.-]{1,64}"))
                    }
                    fn visit_str<E: de::Error>(self, text: &str) -> Result<$name, E> {
                        $name::parse(text).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(IdVisitor)
            }
        }
    };
}

ident_type!(
    /// A SKU's id.
    SkuId,
    "sku_id"
);
ident_type!(
    /// A user's id, the `sub` of their token.
    UserId,
    "user_id"
);
ident_type!(
    /// A promotion's code.
    PromoCode,
    "code"
);
ident_type!(
    /// The payment provider's reference for a payment.
    PaymentRef,
    "payment_ref"
);

/// An order's id: a number handed out in increasing order, so newer orders
/// have larger ids. Reservations draw from the same sequence.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct OrderId(pub u64);

impl OrderId {
    /// Parses the decimal text form used in paths.
    ///
    /// # Errors
    /// `DomainError::Invalid` when the text is not a positive decimal number
    /// of at most 20 digits.
    pub fn parse(text: &str) -> Result<OrderId, DomainError> {
        let invalid = || DomainError::invalid("order_id must be a positive decimal number");
        if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        match text.parse::<u64>() {
            Ok(0) | Err(_) => Err(invalid()),
            Ok(n) => Ok(OrderId(n)),
        }
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A client's `Idempotency-Key`: 1..=255 visible ASCII characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize)]
pub struct IdempotencyKey(Box<str>);

impl IdempotencyKey {
    /// Parses and validates a key.
    ///
    /// # Errors
    /// `DomainError::Invalid` when the key is empty, longer than 255 bytes or
    /// has a byte outside visible ASCII (`!`..=`~`).
    pub fn parse(text: &str) -> Result<IdempotencyKey, DomainError> {
        if text.is_empty()
            || text.len() > IDEMPOTENCY_KEY_BYTES_MAX
            || !text.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(DomainError::invalid(format!(
                "Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} visible ASCII characters"
            )));
        }
        Ok(IdempotencyKey(text.into()))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for IdempotencyKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<IdempotencyKey, D::Error> {
        let text = String::deserialize(deserializer)?;
        IdempotencyKey::parse(&text).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_the_contract_alphabet_and_length() {
        assert!(SkuId::parse("Ab0_.-").is_ok());
        assert_eq!(
            SkuId::parse(&"x".repeat(64)).map(|s| s.as_str().len()),
            Ok(64)
        );
        for bad in ["", " ", "a b", "ä", "a/b", "a\0", &"x".repeat(65)] {
            assert!(SkuId::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn ids_compare_and_hash_by_text() {
        let a = UserId::parse("alice").expect("valid");
        let b = UserId::parse("alice").expect("valid");
        assert_eq!(a, b);
        assert!(UserId::parse("a").expect("valid") < UserId::parse("b").expect("valid"));
        assert_eq!(format!("{a}"), "alice");
    }

    #[test]
    fn ids_validate_when_deserialised() {
        let ok: Result<SkuId, _> = serde_json::from_str("\"tee-1\"");
        assert!(ok.is_ok());
        let bad: Result<SkuId, _> = serde_json::from_str("\"tee 1\"");
        assert!(bad.is_err());
    }

    #[test]
    fn order_ids_are_positive_decimals() {
        assert_eq!(OrderId::parse("42"), Ok(OrderId(42)));
        for bad in [
            "",
            "0",
            "-1",
            "1e3",
            "x",
            "123456789012345678901",
            "18446744073709551616",
        ] {
            assert!(OrderId::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn idempotency_keys_are_visible_ascii() {
        assert!(IdempotencyKey::parse("k-1:/~").is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        for bad in ["", "a b", "é", &"k".repeat(256)] {
            assert!(
                IdempotencyKey::parse(bad).is_err(),
                "{bad:?} must be refused"
            );
        }
    }
}
