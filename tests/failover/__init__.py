"""The failover mechanism on a test server over a memfd: the keeper, the takeover without INIT, the resend, standby and upgrade."""
