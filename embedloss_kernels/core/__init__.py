"""The shared leaves at the bottom of the package: the op contract, input validation, supported versions and the
one-time log messages. They import nothing of the package above them."""
