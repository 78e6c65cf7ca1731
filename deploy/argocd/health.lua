-- Argo CD health for kube-audit.io AuditUser and AuditPolicy (kstatus conditions).
-- Install under resource.customizations.health.kube-audit.io_AuditUser and
-- resource.customizations.health.kube-audit.io_AuditPolicy in argocd-cm (see docs/gitops.md).
local hs = { status = "Progressing", message = "Waiting for kube-audit to apply it" }
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local generation = obj.metadata.generation or 0
if obj.status.observedGeneration ~= nil and obj.status.observedGeneration < generation then
  hs.message = "Waiting for kube-audit to observe generation " .. generation
  return hs
end
local ready, stalled, reconciling, shipping
for _, condition in ipairs(obj.status.conditions) do
  if condition.type == "Ready" then ready = condition end
  if condition.type == "Stalled" then stalled = condition end
  if condition.type == "Reconciling" then reconciling = condition end
  if condition.type == "Shipping" then shipping = condition end
end
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = stalled.message or stalled.reason or "Stalled"
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  -- The audit store not reached from a node: a warning in the message, not a failure.
  if shipping ~= nil and shipping.status == "False" then
    hs.message = hs.message .. "; not shipping: " .. (shipping.message or shipping.reason or "")
  end
  return hs
end
-- An AuditUser past its spec.expiresAt does what it says: nothing to wait for.
if ready ~= nil and ready.reason == "Expired" then
  hs.status = "Healthy"
  hs.message = ready.message or "Expired"
  return hs
end
if reconciling ~= nil and reconciling.status == "True" then
  hs.message = reconciling.message or "Reconciling"
end
return hs
