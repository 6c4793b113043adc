"""The ground floor: errors, units, the task vocabulary, atomic files and optional imports.

Nothing here imports torch or any other floor of the package.
"""
