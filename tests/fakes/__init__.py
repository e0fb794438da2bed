"""Test fakes: local stand-ins for remote clouds we cannot reach, speaking their real wire protocols."""
