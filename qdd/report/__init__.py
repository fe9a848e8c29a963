"""The study's figures and tables from finished test runs (`qdd-cli report`)."""
