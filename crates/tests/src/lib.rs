//! End-to-end harness: starts hubs, concierges and agents as real processes on
//! 127.0.0.1 with ephemeral ports. Grows with the components it drives.
