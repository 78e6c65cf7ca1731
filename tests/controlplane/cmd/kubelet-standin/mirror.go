package main

import (
	"context"
	"strconv"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"
	kubetypes "k8s.io/kubernetes/pkg/kubelet/types"
)

// syncMirrorPods keeps the Node and one mirror pod per running static pod in the API, as kubelet
// does: a mirror pod whose config.mirror is not the static pod's hash is deleted and created
// anew; status follows the processes. The API may be down (it is often our own apiserver
// restarting), so every step is retried on the next tick. Every 10 s it renews the node's Lease in
// kube-node-lease, kubelet's heartbeat: without it the node lifecycle controller marks the Node
// unreachable and taints it, and the DaemonSet controller no longer makes pods for it.
func (n *node) syncMirrorPods(ctx context.Context) {
	var client *kubernetes.Clientset
	var nodeUID types.UID
	var renewed time.Time
	ticker := time.NewTicker(time.Second)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		var err error
		if client == nil {
			if client, err = n.client(); err != nil {
				klog.ErrorS(err, "kubeconfig")
				continue
			}
		}
		if nodeUID == "" {
			if nodeUID, err = n.ensureNode(ctx, client); err != nil {
				continue
			}
		}
		if err := n.syncOnce(ctx, client, nodeUID); err != nil {
			klog.V(2).InfoS("mirror pod sync", "err", err)
		}
		if time.Since(renewed) >= 10*time.Second {
			if err := n.renewLease(ctx, client, nodeUID); err != nil {
				klog.V(2).InfoS("node lease", "err", err)
			} else {
				renewed = time.Now()
			}
		}
	}
}

func (n *node) renewLease(ctx context.Context, client *kubernetes.Clientset, nodeUID types.UID) error {
	leases := client.CoordinationV1().Leases(v1.NamespaceNodeLease)
	now := metav1.NewMicroTime(time.Now())
	lease, err := leases.Get(ctx, n.name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		duration := int32(40)
		_, err = leases.Create(ctx, &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: n.name, OwnerReferences: []metav1.OwnerReference{{
				APIVersion: "v1", Kind: "Node", Name: n.name, UID: nodeUID,
			}}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: &n.name, LeaseDurationSeconds: &duration, RenewTime: &now},
		}, metav1.CreateOptions{})
		return err
	}
	if err != nil {
		return err
	}
	lease.Spec.RenewTime = &now
	_, err = leases.Update(ctx, lease, metav1.UpdateOptions{})
	return err
}

func (n *node) ensureNode(ctx context.Context, client *kubernetes.Clientset) (types.UID, error) {
	existing, err := client.CoreV1().Nodes().Get(ctx, n.name, metav1.GetOptions{})
	if err == nil {
		return existing.UID, nil
	}
	if !apierrors.IsNotFound(err) {
		return "", err
	}
	created, err := client.CoreV1().Nodes().Create(ctx, &v1.Node{ObjectMeta: metav1.ObjectMeta{
		Name: n.name,
		Labels: map[string]string{
			"kubernetes.io/hostname":                n.name,
			"kubernetes.io/os":                      "linux",
			"node-role.kubernetes.io/control-plane": "",
		},
	}}, metav1.CreateOptions{})
	if err != nil {
		return "", err
	}
	now := metav1.Now()
	created.Status = v1.NodeStatus{
		Addresses:       []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: n.ip}, {Type: v1.NodeHostName, Address: n.name}},
		DaemonEndpoints: v1.NodeDaemonEndpoints{KubeletEndpoint: v1.DaemonEndpoint{Port: int32(n.port)}},
		Conditions: []v1.NodeCondition{{
			Type: v1.NodeReady, Status: v1.ConditionTrue, Reason: "KubeletReady",
			Message: "kubelet stand-in is posting ready status", LastHeartbeatTime: now, LastTransitionTime: now,
		}},
	}
	updated, err := client.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{})
	if err != nil {
		return "", err
	}
	// The not-ready taint admission put on the new Node goes once it is Ready: the node
	// lifecycle controller's job, which the tier does not run.
	var taints []v1.Taint
	for _, taint := range updated.Spec.Taints {
		if taint.Key != v1.TaintNodeNotReady {
			taints = append(taints, taint)
		}
	}
	if len(taints) != len(updated.Spec.Taints) {
		updated.Spec.Taints = taints
		if _, err := client.CoreV1().Nodes().Update(ctx, updated, metav1.UpdateOptions{}); err != nil {
			return "", err
		}
	}
	return created.UID, nil
}

func (n *node) syncOnce(ctx context.Context, client *kubernetes.Clientset, nodeUID types.UID) error {
	states := n.snapshot()
	wanted := map[string]bool{}
	for _, state := range states {
		wanted[state.pod.Namespace+"/"+state.pod.Name] = true
		if err := n.syncMirror(ctx, client, nodeUID, state); err != nil {
			return err
		}
	}
	mirrors, err := client.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + n.name})
	if err != nil {
		return err
	}
	for _, pod := range mirrors.Items {
		if _, isMirror := pod.Annotations[kubetypes.ConfigMirrorAnnotationKey]; isMirror && !wanted[pod.Namespace+"/"+pod.Name] {
			if err := deleteMirror(ctx, client, &pod); err != nil {
				return err
			}
		}
	}
	return nil
}

func deleteMirror(ctx context.Context, client *kubernetes.Clientset, pod *v1.Pod) error {
	zero := int64(0)
	err := client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: &zero, Preconditions: &metav1.Preconditions{UID: &pod.UID},
	})
	if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
		return nil
	}
	return err
}

func (n *node) syncMirror(ctx context.Context, client *kubernetes.Clientset, nodeUID types.UID, state podState) error {
	static := state.pod
	hash := hashOf(static)
	pods := client.CoreV1().Pods(static.Namespace)
	mirror, err := pods.Get(ctx, static.Name, metav1.GetOptions{})
	if err == nil && mirror.Annotations[kubetypes.ConfigMirrorAnnotationKey] != hash {
		if err := deleteMirror(ctx, client, mirror); err != nil {
			return err
		}
		err = apierrors.NewNotFound(v1.Resource("pods"), static.Name)
	}
	if apierrors.IsNotFound(err) {
		fresh := static.DeepCopy()
		fresh.UID, fresh.ResourceVersion, fresh.Status = "", "", v1.PodStatus{}
		fresh.Annotations[kubetypes.ConfigMirrorAnnotationKey] = hash
		fresh.Annotations[kubetypes.ConfigSourceAnnotationKey] = kubetypes.FileSource
		fresh.Annotations[kubetypes.ConfigFirstSeenAnnotationKey] = state.firstStart().Format(time.RFC3339Nano)
		controller := true
		fresh.OwnerReferences = []metav1.OwnerReference{{
			APIVersion: "v1", Kind: "Node", Name: n.name, UID: nodeUID, Controller: &controller,
		}}
		if mirror, err = pods.Create(ctx, fresh, metav1.CreateOptions{}); err != nil {
			return err
		}
	} else if err != nil {
		return err
	}
	status := n.podStatus(state)
	if statusEqual(mirror.Status, status) {
		return nil
	}
	mirror.Status = status
	_, err = pods.UpdateStatus(ctx, mirror, metav1.UpdateOptions{})
	return err
}

func (s podState) firstStart() time.Time {
	for _, c := range s.containers {
		if !c.started.IsZero() {
			return c.started
		}
	}
	return time.Now()
}

func (n *node) podStatus(state podState) v1.PodStatus {
	allReady, allRunning := true, true
	var statuses []v1.ContainerStatus
	for _, c := range state.containers {
		started := c.running
		status := v1.ContainerStatus{
			Name: c.name, Image: c.image, ImageID: c.image, Ready: c.ready, Started: &started,
			RestartCount: int32(c.restarts), LastTerminationState: v1.ContainerState{Terminated: c.lastExit},
		}
		if c.running {
			status.ContainerID = "standin://" + strconv.Itoa(c.pid)
			status.State.Running = &v1.ContainerStateRunning{StartedAt: metav1.NewTime(c.started.Truncate(time.Second))}
		} else {
			status.State.Waiting = &v1.ContainerStateWaiting{Reason: c.waiting}
		}
		allReady = allReady && c.ready
		allRunning = allRunning && c.running
		statuses = append(statuses, status)
	}
	condition := func(t v1.PodConditionType, ok bool) v1.PodCondition {
		s := v1.ConditionFalse
		if ok {
			s = v1.ConditionTrue
		}
		return v1.PodCondition{Type: t, Status: s}
	}
	phase := v1.PodRunning
	if !allRunning && len(state.containers) > 0 && statuses[0].LastTerminationState.Terminated == nil {
		phase = v1.PodPending
	}
	return v1.PodStatus{
		Phase:  phase,
		HostIP: n.ip, PodIP: n.ip,
		HostIPs: []v1.HostIP{{IP: n.ip}}, PodIPs: []v1.PodIP{{IP: n.ip}},
		Conditions: []v1.PodCondition{
			condition(v1.PodScheduled, true), condition(v1.PodInitialized, true),
			condition(v1.ContainersReady, allReady), condition(v1.PodReady, allReady),
		},
		ContainerStatuses: statuses,
	}
}

// statusEqual compares what we set (the apiserver adds transition times we do not track).
func statusEqual(a, b v1.PodStatus) bool {
	if a.Phase != b.Phase || len(a.ContainerStatuses) != len(b.ContainerStatuses) || a.PodIP != b.PodIP {
		return false
	}
	for i := range a.ContainerStatuses {
		x, y := a.ContainerStatuses[i], b.ContainerStatuses[i]
		if x.Ready != y.Ready || x.ContainerID != y.ContainerID || x.RestartCount != y.RestartCount ||
			(x.State.Waiting == nil) != (y.State.Waiting == nil) {
			return false
		}
	}
	return true
}
