"""Built-in jobs: workflows and the site executors that go with them.

- ``fedstats``: federated statistics of a data set scikit-learn ships (the main demo job);
- ``linreg``: FedAvg linear regression on scikit-learn's diabetes data;
- ``bench``: empty rounds for the benchmarks;
- ``catalog``: ready-made job specs by name.
"""
