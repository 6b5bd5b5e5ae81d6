"""Encoders as plain nn.Modules and the layers they are built from."""
