// gitops-health judges kube-audit objects the way Flux and Argo CD do, with their own code:
// Flux's kstatus (github.com/fluxcd/cli-utils, the fork kustomize-controller's health checks
// use) and Argo CD's Lua health check run in gopher-lua with the libraries Argo CD opens for a
// health customization from argocd-cm (package, base, table; Argo CD's reduced os library is not
// loaded, so a script using os fails here, which is stricter than Argo CD), and a Kustomization's
// healthCheckExprs through Flux's own CEL status evaluator (github.com/fluxcd/pkg/runtime/cel).
//
// Input (stdin): {"lua": "<script>", "healthCheckExprs": [...], "objects": [<object>, ...]}.
// Output (stdout): one JSON line per object:
// {"kstatus", "kstatusMessage", "fluxExprs", "argo", "argoMessage"}.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/fluxcd/cli-utils/pkg/kstatus/status"
	"github.com/fluxcd/pkg/apis/kustomize"
	fluxcel "github.com/fluxcd/pkg/runtime/cel"
	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

type input struct {
	Lua              string                        `json:"lua"`
	HealthCheckExprs []kustomize.CustomHealthCheck `json:"healthCheckExprs"`
	Objects          []map[string]interface{}      `json:"objects"`
}

type verdict struct {
	Kstatus        string `json:"kstatus"`
	KstatusMessage string `json:"kstatusMessage"`
	FluxExprs      string `json:"fluxExprs"`
	Argo           string `json:"argo"`
	ArgoMessage    string `json:"argoMessage"`
}

func main() {
	var in input
	decoder := json.NewDecoder(os.Stdin)
	decoder.UseNumber()
	if err := decoder.Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "gitops-health: reading stdin:", err)
		os.Exit(2)
	}
	out := json.NewEncoder(os.Stdout)
	for _, obj := range in.Objects {
		obj = normalize(obj).(map[string]interface{})
		var v verdict
		result, err := status.Compute(&unstructured.Unstructured{Object: obj})
		if err != nil {
			v.Kstatus, v.KstatusMessage = "error", err.Error()
		} else {
			v.Kstatus, v.KstatusMessage = result.Status.String(), result.Message
		}
		v.FluxExprs = fluxExprs(obj, in.HealthCheckExprs)
		v.Argo, v.ArgoMessage = argoHealth(obj, in.Lua)
		if err := out.Encode(v); err != nil {
			fmt.Fprintln(os.Stderr, "gitops-health: writing stdout:", err)
			os.Exit(2)
		}
	}
}

// normalize turns JSON numbers into int64 or float64, as an object read from the API is typed
// when a controller holds it (kstatus reads observedGeneration as int64).
func normalize(value interface{}) interface{} {
	switch v := value.(type) {
	case map[string]interface{}:
		for key, item := range v {
			v[key] = normalize(item)
		}
		return v
	case []interface{}:
		for i, item := range v {
			v[i] = normalize(item)
		}
		return v
	case json.Number:
		if n, err := v.Int64(); err == nil {
			return n
		}
		f, _ := v.Float64()
		return f
	}
	return value
}

// fluxExprs is the Kustomization's verdict with healthCheckExprs ("none" where no expression
// names the object's kind: kstatus decides then).
func fluxExprs(obj map[string]interface{}, checks []kustomize.CustomHealthCheck) string {
	u := &unstructured.Unstructured{Object: obj}
	for _, check := range checks {
		if check.APIVersion != u.GetAPIVersion() || check.Kind != u.GetKind() {
			continue
		}
		evaluator, err := fluxcel.NewStatusEvaluator(&check.HealthCheckExpressions)
		if err != nil {
			return "error: " + err.Error()
		}
		result, err := evaluator.Evaluate(context.Background(), u)
		if err != nil {
			return "error: " + err.Error()
		}
		return result.Status.String()
	}
	return "none"
}

func argoHealth(obj map[string]interface{}, script string) (string, string) {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for name, open := range map[string]lua.LGFunction{
		lua.LoadLibName: lua.OpenPackage,
		lua.BaseLibName: lua.OpenBase,
		lua.TabLibName:  lua.OpenTable,
	} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(open), Protect: true}, lua.LString(name)); err != nil {
			return "error", err.Error()
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, obj))
	if err := l.DoString(script); err != nil {
		return "error", err.Error()
	}
	table, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		return "error", fmt.Sprintf("expected a table from the script, got %s", l.Get(-1).Type())
	}
	return lua.LVAsString(table.RawGetString("status")), lua.LVAsString(table.RawGetString("message"))
}

// toLua converts an object as Argo CD does before it runs a health script.
func toLua(l *lua.LState, value interface{}) lua.LValue {
	switch v := value.(type) {
	case bool:
		return lua.LBool(v)
	case float64:
		return lua.LNumber(v)
	case int64:
		return lua.LNumber(v)
	case string:
		return lua.LString(v)
	case []interface{}:
		table := l.CreateTable(len(v), 0)
		for _, item := range v {
			table.Append(toLua(l, item))
		}
		return table
	case map[string]interface{}:
		table := l.CreateTable(0, len(v))
		for key, item := range v {
			table.RawSetH(lua.LString(key), toLua(l, item))
		}
		return table
	}
	return lua.LNil
}
