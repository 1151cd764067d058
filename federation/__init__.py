"""The federated task that devices and the server share: run config, model, device training, ClientApp."""
