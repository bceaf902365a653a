//! Device keys: 32 random bytes from the operating system's CSPRNG.

use fleet_api::DeviceKey;
use rand::RngCore;

/// A fresh key. Only its hash is stored; the caller shows the key once.
pub fn generate() -> DeviceKey {
    let mut bytes = [0u8; 32];
    // ThreadRng is a CSPRNG (ChaCha12) seeded and periodically reseeded from the OS.
    rand::rng().fill_bytes(&mut bytes);
    DeviceKey::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_differ() {
        assert_ne!(super::generate(), super::generate());
    }
}
