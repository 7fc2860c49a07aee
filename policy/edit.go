package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"strings"

	"github.com/tailscale/hujson"
	"tailscale.com/tailcfg"
)

// An Edit changes a policy file (HuJSON) and returns the new file, or the
// same bytes when there is nothing to change. Apply calls it again on a
// fresh copy of the file when someone else wrote in between, so it must
// depend only on its input.
type Edit func(file []byte) ([]byte, error)

// SetRegion is the Edit that makes region r.RegionID of derpMap.Regions
// exactly r — replacing the region that is there, or adding it, and
// creating "derpMap" and "Regions" when missing. Everything outside that
// region keeps its bytes (comments, order, other regions, acls); the new
// region is indented like its neighbours. When the region already equals r
// (compared as decoded values, so formatting and comments inside it do not
// count), the file is returned unchanged.
func SetRegion(r *tailcfg.DERPRegion) Edit {
	return func(file []byte) ([]byte, error) { return setRegion(file, r) }
}

// RemoveNode is the Edit that takes one node out of region regionID: the
// node whose HostName is hostName (case-insensitively) and, when derpPort
// is not 0, whose DERP port is derpPort (a node without DERPPort serves
// 443). When it was the region's last node, the whole region goes. When
// there is no such node (or region), the file is returned unchanged. Other
// nodes of the region keep their bytes.
func RemoveNode(regionID int, hostName string, derpPort int) Edit {
	return func(file []byte) ([]byte, error) { return removeNode(file, regionID, hostName, derpPort) }
}

// doc is a parsed policy file and what is needed to add to it in its style.
type doc struct {
	src  []byte
	root hujson.Value
	unit string // one level of indentation, as the file uses it
}

func parseDoc(file []byte) (*doc, error) {
	v, err := hujson.Parse(file)
	if err != nil {
		return nil, fmt.Errorf("policy: the policy file is not HuJSON: %w", err)
	}
	root, ok := v.Value.(*hujson.Object)
	if !ok {
		return nil, errors.New("policy: the policy file is not a JSON object")
	}
	d := &doc{src: file, root: v, unit: "\t"} // Tailscale's default file uses tabs
	if len(root.Members) > 0 {
		if ind, ok := d.lineIndent(root.Members[0].Name.StartOffset); ok && ind != "" {
			d.unit = ind
		}
	}
	return d, nil
}

// checkHuJSON says whether b is a HuJSON object, as a policy file must be.
func checkHuJSON(b []byte) error {
	v, err := hujson.Parse(b)
	if err != nil {
		return err
	}
	if _, ok := v.Value.(*hujson.Object); !ok {
		return errors.New("not an object")
	}
	return nil
}

// lineIndent is the whitespace before off on its line, and whether off is
// the first thing on the line.
func (d *doc) lineIndent(off int) (string, bool) {
	start := bytes.LastIndexByte(d.src[:off], '\n') + 1
	ind := d.src[start:off]
	return string(ind), len(bytes.TrimLeft(ind, " \t")) == 0
}

// containerIndent is the indentation of the line on which v starts.
func (d *doc) containerIndent(v *hujson.Value) string {
	start := bytes.LastIndexByte(d.src[:v.StartOffset], '\n') + 1
	line := d.src[start:v.StartOffset]
	return string(line[:len(line)-len(bytes.TrimLeft(line, " \t"))])
}

// memberIndent is the indentation of obj's members (obj is the value v).
func (d *doc) memberIndent(v *hujson.Value, obj *hujson.Object) string {
	if len(obj.Members) > 0 {
		if ind, ok := d.lineIndent(obj.Members[0].Name.StartOffset); ok {
			return ind
		}
	}
	return d.containerIndent(v) + d.unit
}

// member finds the member called name: exactly, else case-insensitively
// (the policy file's keys are matched that way: "regions" is "Regions").
func member(obj *hujson.Object, name string) int {
	for i, m := range obj.Members {
		if lit, ok := m.Name.Value.(hujson.Literal); ok && lit.String() == name {
			return i
		}
	}
	for i, m := range obj.Members {
		if lit, ok := m.Name.Value.(hujson.Literal); ok && strings.EqualFold(lit.String(), name) {
			return i
		}
	}
	return -1
}

// render is v as indented JSON whose lines after the first start with
// indent, ready to sit after a member name at that indentation.
func (d *doc) render(v any, indent string) (hujson.ValueTrimmed, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	enc.SetIndent(indent, d.unit)
	if err := enc.Encode(v); err != nil {
		return nil, fmt.Errorf("policy: encoding the region: %w", err)
	}
	hv, err := hujson.Parse(bytes.TrimSpace(b.Bytes()))
	if err != nil {
		return nil, fmt.Errorf("policy: encoding the region: %w", err)
	}
	return hv.Value, nil
}

// insert appends member name: v to obj (the value ov), on a line of its
// own after everything already there (comments included), keeping obj's
// trailing-comma style.
func (d *doc) insert(ov *hujson.Value, obj *hujson.Object, name string, v any) error {
	indent := d.memberIndent(ov, obj)
	val, err := d.render(v, indent)
	if err != nil {
		return err
	}
	// obj.AfterExtra runs from the last comma (or the brace) to the
	// closing brace: keep all of it but its last line, the brace's own
	// indentation, before the new member.
	head, tail := []byte(obj.AfterExtra), []byte("\n"+d.containerIndent(ov))
	if i := bytes.LastIndexByte(obj.AfterExtra, '\n'); i >= 0 && len(bytes.Trim(obj.AfterExtra[i:], " \t\r\n")) == 0 {
		head, tail = obj.AfterExtra[:i], obj.AfterExtra[i:]
	}
	var comma hujson.Extra
	if n := len(obj.Members); n > 0 && obj.Members[n-1].Value.AfterExtra != nil {
		comma = hujson.Extra{}
	}
	obj.Members = append(obj.Members, hujson.ObjectMember{
		Name:  hujson.Value{BeforeExtra: hujson.Extra(string(head) + "\n" + indent), Value: hujson.String(name)},
		Value: hujson.Value{BeforeExtra: hujson.Extra(" "), Value: val, AfterExtra: comma},
	})
	obj.AfterExtra = append(hujson.Extra(nil), tail...)
	return nil
}

// regions finds derpMap.Regions; regionsObj is nil when either is missing.
func (d *doc) regions() (dm *hujson.Value, regions *hujson.Value, err error) {
	root := d.root.Value.(*hujson.Object)
	i := member(root, "derpMap")
	if i < 0 {
		return nil, nil, nil
	}
	dm = &root.Members[i].Value
	dmObj, ok := dm.Value.(*hujson.Object)
	if !ok {
		return nil, nil, errors.New("policy: the policy file's derpMap is not an object")
	}
	j := member(dmObj, "Regions")
	if j < 0 {
		return dm, nil, nil
	}
	regions = &dmObj.Members[j].Value
	if _, ok := regions.Value.(*hujson.Object); !ok {
		return nil, nil, errors.New("policy: the policy file's derpMap.Regions is not an object")
	}
	return dm, regions, nil
}

// decodeRegion decodes a region as the policy file holds it (HuJSON).
func decodeRegion(v hujson.Value) (*tailcfg.DERPRegion, error) {
	v = v.Clone()
	v.Standardize()
	var r tailcfg.DERPRegion
	if err := json.Unmarshal(v.Pack(), &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// normalized is r as it reads back from JSON, so two regions compare by
// what the file would say.
func normalized(r *tailcfg.DERPRegion) (*tailcfg.DERPRegion, error) {
	b, err := json.Marshal(r)
	if err != nil {
		return nil, err
	}
	var n tailcfg.DERPRegion
	return &n, json.Unmarshal(b, &n)
}

func setRegion(file []byte, r *tailcfg.DERPRegion) ([]byte, error) {
	if r == nil || r.RegionID <= 0 || len(r.Nodes) == 0 {
		return nil, errors.New("policy: the region to write needs a RegionID and at least one node")
	}
	d, err := parseDoc(file)
	if err != nil {
		return nil, err
	}
	key := strconv.Itoa(r.RegionID)
	dm, regs, err := d.regions()
	if err != nil {
		return nil, err
	}
	switch {
	case dm == nil:
		root := d.root.Value.(*hujson.Object)
		err = d.insert(&d.root, root, "derpMap", map[string]any{"Regions": map[string]any{key: r}})
	case regs == nil:
		err = d.insert(dm, dm.Value.(*hujson.Object), "Regions", map[string]any{key: r})
	default:
		obj := regs.Value.(*hujson.Object)
		i := member(obj, key)
		if i < 0 {
			err = d.insert(regs, obj, key, r)
			break
		}
		m := &obj.Members[i]
		if have, derr := decodeRegion(m.Value); derr == nil {
			want, nerr := normalized(r)
			if nerr != nil {
				return nil, fmt.Errorf("policy: encoding the region: %w", nerr)
			}
			if reflect.DeepEqual(have, want) {
				return file, nil
			}
		}
		indent, _ := d.lineIndent(m.Name.StartOffset)
		var val hujson.ValueTrimmed
		val, err = d.render(r, indent)
		m.Value.Value = val
	}
	if err != nil {
		return nil, err
	}
	return d.pack()
}

func removeNode(file []byte, regionID int, hostName string, derpPort int) ([]byte, error) {
	d, err := parseDoc(file)
	if err != nil {
		return nil, err
	}
	_, regs, err := d.regions()
	if err != nil || regs == nil {
		return file, err
	}
	obj := regs.Value.(*hujson.Object)
	i := member(obj, strconv.Itoa(regionID))
	if i < 0 {
		return file, nil
	}
	rv := &obj.Members[i].Value
	have, err := decodeRegion(*rv)
	if err != nil {
		return nil, fmt.Errorf("policy: derpMap region %d: %w", regionID, err)
	}
	idx := -1
	for j, n := range have.Nodes {
		if n != nil && strings.EqualFold(n.HostName, hostName) && (derpPort == 0 || port(n) == derpPort) {
			idx = j
			break
		}
	}
	switch {
	case idx < 0:
		return file, nil
	case len(have.Nodes) == 1:
		removeAt(obj, i)
	default:
		robj, ok := rv.Value.(*hujson.Object)
		if !ok {
			return nil, fmt.Errorf("policy: derpMap region %d is not an object", regionID)
		}
		k := member(robj, "Nodes")
		if k < 0 {
			return nil, fmt.Errorf("policy: derpMap region %d has no Nodes", regionID)
		}
		nodes, ok := robj.Members[k].Value.Value.(*hujson.Array)
		if !ok || len(nodes.Elements) != len(have.Nodes) {
			return nil, fmt.Errorf("policy: derpMap region %d: Nodes is not a list", regionID)
		}
		removeAt(nodes, idx)
	}
	return d.pack()
}

// port is the node's DERP port (0 in the file means 443).
func port(n *tailcfg.DERPNode) int {
	if n.DERPPort == 0 {
		return 443
	}
	return n.DERPPort
}

// removeAt removes member or element i of comp with the comments that
// belong to it (hujson's JSON Patch "remove" knows which those are), and
// keeps the trailing comma when the last one goes.
func removeAt(comp hujson.ValueTrimmed, i int) {
	var trailing, last bool
	var after *hujson.Extra // before the closing brace or bracket
	wrap := hujson.Value{Value: comp}
	switch c := comp.(type) {
	case *hujson.Object:
		last, after = i == len(c.Members)-1, &c.AfterExtra
		trailing = last && c.Members[i].Value.AfterExtra != nil
	case *hujson.Array:
		last, after = i == len(c.Elements)-1, &c.AfterExtra
		trailing = last && c.Elements[i].AfterExtra != nil
	}
	closing := lastLine(*after)
	// The pointer is relative to comp itself; member names are escaped.
	ptr := "/" + strconv.Itoa(i)
	if o, ok := comp.(*hujson.Object); ok {
		name := o.Members[i].Name.Value.(hujson.Literal).String()
		ptr = "/" + strings.NewReplacer("~", "~0", "/", "~1").Replace(name)
	}
	patch, _ := json.Marshal([]map[string]string{{"op": "remove", "path": ptr}})
	if err := wrap.Patch(patch); err != nil {
		panic("policy: removing a member that was just found: " + err.Error()) // cannot happen
	}
	if last && closing != nil {
		// hujson hands the removed member's line to the closing brace:
		// give the brace its own indentation back.
		if l := lastLine(*after); l != nil {
			*after = append((*after)[:len(*after)-len(l):len(*after)-len(l)], closing...)
		}
	}
	if !trailing {
		return
	}
	switch c := comp.(type) {
	case *hujson.Object:
		if n := len(c.Members); n > 0 && c.Members[n-1].Value.AfterExtra == nil {
			c.Members[n-1].Value.AfterExtra = hujson.Extra{}
		}
	case *hujson.Array:
		if n := len(c.Elements); n > 0 && c.Elements[n-1].AfterExtra == nil {
			c.Elements[n-1].AfterExtra = hujson.Extra{}
		}
	}
}

// lastLine is the whitespace-only last line of e, from its last newline;
// nil when e has none.
func lastLine(e hujson.Extra) hujson.Extra {
	i := bytes.LastIndexByte(e, '\n')
	if i < 0 || len(bytes.Trim(e[i:], " \t\r\n")) > 0 {
		return nil
	}
	return append(hujson.Extra(nil), e[i:]...)
}

// pack serializes the edited file and checks it still reads as a policy
// file.
func (d *doc) pack() ([]byte, error) {
	out := d.root.Pack()
	// Standardize rewrites its argument in place: check a copy.
	if _, err := hujson.Standardize(bytes.Clone(out)); err != nil {
		return nil, fmt.Errorf("policy: the edited file does not parse (a bug): %w", err)
	}
	return out, nil
}
