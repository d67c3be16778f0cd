"""Ember's client-side package: wire protocol types, tool-call parsers, the tool decorator and the
SDK. Imports neither torch nor any other Ember package, so an agent framework can depend on it alone."""
