"""The process side without a mount: the configuration contract, the CPU wake-up bound."""
