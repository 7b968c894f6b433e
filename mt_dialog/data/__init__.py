"""Offline data pipeline: read conversations, render them with a chat template, pack, store."""
